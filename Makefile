# Two commands do everything on a fresh machine:  make serve   and   make test
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export BENTOML_DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export UV_CACHE_DIR ?= $(CURDIR)/.cache/uv

# The embedded default of `make serve`: a local MLflow store and the file backup, nothing else.
SERVE_MLFLOW ?= sqlite:///$(CURDIR)/data/mlflow.db
SERVE_MODELS ?= prompt_injection
# The demo's promotion gate: held-out examples, short and long (training/data/gate_prompt_injection.jsonl);
# the demo model reads about 0.82 of it. SERVE_GATE='{}' turns it off.
SERVE_GATE ?= {"prompt_injection": {"path": "training/data/gate_prompt_injection.jsonl", "min_accuracy": 0.7, "max_drop": 0.05}}
# The local reload bus, shared by the service and the publishing commands (no Redis needed).
export REGISTRY_RELOAD_DIR ?= $(CURDIR)/data/reload
PORT ?= 3000

.PHONY: setup test serve demo-model training-api bench plots docs build container container-test example-wheel clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@echo "Setting up $(VENV): torch (CPU build) and the pinned dependencies; 3-6 minutes the first time, silent while pip works."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e ".[test,bench,accelerate]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest --ignore=tests/test_container.py $(PYTEST_ARGS)

# Trains and publishes the demo prompt-injection classifier when none is registered yet.
demo-model: setup
	MLFLOW_TRACKING_URI=$(SERVE_MLFLOW) REGISTRY_BACKUP_PATH=data/model_registry.json \
		$(BIN)/python -m training.demo --if-missing --name $(SERVE_MODELS)

serve: demo-model
	MLFLOW_TRACKING_URI=$(SERVE_MLFLOW) REGISTRY_MODELS=$(SERVE_MODELS) REGISTRY_GATE='$(SERVE_GATE)' \
		REGISTRY_BACKUP_PATH=data/model_registry.json REGISTRY_ARTIFACT_CACHE=data/artifacts \
		$(BIN)/bentoml serve service:SecurityClassifier --port $(PORT)

training-api: setup
	$(BIN)/python -m training.api

# Benchmarks beside their baselines: make bench BENCH_ARGS='--quick --only resolution,hotpath'
bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

# The docs' plots from a results file: make plots BENCH_RESULTS=bench/results.json (default: the reference run)
plots: setup
	$(BIN)/python -m bench.plots $(BENCH_RESULTS)

# The reference pages (docs/, mkdocs-material) into .cache/site; `mkdocs serve` to browse them
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

build: setup
	$(BIN)/bentoml build

# The image (podman; README "Container"): TORCH=cuda for the CUDA build, REBUILD=1 to ignore the reuse label.
container: setup
	deploy/container/build

# The image against real Redis, MLflow + S3 (moto) and a file backup on this host.
container-test: container
	$(BIN)/python -m pytest tests/test_container.py $(PYTEST_ARGS)

# The plugin as a wheel, for the example's bento: make example-wheel && cd examples/spam && ../../.venv/bin/bentoml build
example-wheel: setup
	$(BIN)/pip wheel -q --no-deps -w examples/spam/wheels .

clean:
	rm -rf $(VENV) data .pytest_cache
