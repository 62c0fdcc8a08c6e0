"""Peers serving the same demo artifact, measured with the same load generator: a plain BentoML
`@bentoml.api(batchable=True)` service (bench/peer_bentoml.py) and MLServer 1.7 with its Hugging Face
runtime and adaptive batching, from its own virtual environment under `data/` (its pins conflict with
this project's: transformers 4.41, tokenizers 0.19).

A full `make bench` builds that environment when it is missing (pip, a few minutes, once);
`python -m bench.peers --build-mlserver` builds it ahead. A run that cannot build it reports MLServer
as not measured and says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from bench.lab import REPO, Lab
from tests.servers import QUIET_ENV, VENV_BIN, ManagedServer, free_port, http_ok

MLSERVER_VENV = REPO / "data" / "mlserver-venv"
#: What was measured to work: torch first (the CPU wheel), then MLServer with transformers it supports.
MLSERVER_PINS = (["torch==2.13.0"], ["mlserver==1.7.1", "mlserver-huggingface==1.7.1", "transformers==4.41.2",
                                      "tokenizers==0.19.1", "uvloop<0.22"])
#: MLServer's adaptive batching (measured before: batches of 8 within 10 ms beat larger ones on this CPU).
MLSERVER_MAX_BATCH, MLSERVER_MAX_BATCH_TIME = 8, 0.01
#: Every configuration a peer is measured in; its best is what the service is compared with. The machine
#: has 2 cores: each peer gets 1 and 2 intra-op threads, and MLServer its inference pool of 0 (in the
#: server process), 1 and 2 worker processes.
BENTOML_CONFIGS = ({"threads": 1}, {"threads": 2})
MLSERVER_CONFIGS = tuple({"threads": t, "workers": w} for t in (1, 2) for w in (0, 1, 2))


def config_name(family: str, config: dict[str, int]) -> str:
    """`mlserver-t2-w1`: the family, then each setting's initial and value."""
    return "-".join([family, *(f"{k[0]}{v}" for k, v in config.items())])


@dataclass
class Peer:
    """A started server and how to talk to it."""

    name: str
    server: ManagedServer
    path: str
    body: Callable[[str], bytes]  # one text -> request body
    label: Callable[[Any], str]  # parsed JSON answer to one text -> its label

    @property
    def url(self) -> str:
        return self.server.url

    def labels(self, texts: list[str]) -> list[str]:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            out = []
            for text in texts:
                response = client.post(self.path, content=self.body(text), headers={"Content-Type": "application/json"})
                response.raise_for_status()
                out.append(self.label(response.json()))
            return out

    def stop(self) -> None:
        self.server.stop()


def artifact_dirs(lab: Lab) -> tuple[Path, Path]:
    """(weights dir, tokenizer dir) of the demo model's version 1 in the warm artifact cache."""
    from runners.artifacts import ArtifactStore
    from runners.forms import read_mlmodel

    demo = lab.demo()
    path = Path(ArtifactStore(demo.settings()).fetch(demo.records["1"]))  # the warm artifact cache
    flavor = read_mlmodel(path)["flavors"]["transformers"]
    return path / str(flavor.get("model_binary", "model")), path / "components" / "tokenizer"


def bentoml_batchable(lab: Lab, max_batch: int = 8, threads: int = 1) -> Peer:
    name = config_name("bentoml-batchable", {"threads": threads})
    model_dir, tokenizer_dir = artifact_dirs(lab)
    port = free_port()
    env = {**QUIET_ENV, "BENCH_MODEL_DIR": str(model_dir), "BENCH_TOKENIZER_DIR": str(tokenizer_dir),
           "BENCH_MAX_BATCH": str(max_batch), "BENCH_TORCH_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "BENTOML_HOME": str(lab.log_dir / f"bentoml-home-{name}")}
    argv = [str(VENV_BIN / "bentoml"), "serve", "bench.peer_bentoml:PlainClassifier", "--port", str(port), "--host", "127.0.0.1"]
    server = ManagedServer(name, argv, port, lab.log_dir, env=env, cwd=REPO,
                           ready=http_ok(f"http://127.0.0.1:{port}/readyz"), start_timeout=300)
    lab.own(server).start()
    return Peer(name, server, "/classify", lambda t: json.dumps({"texts": [t]}).encode(),
                lambda answer: answer[0]["label"])


def mlserver_missing() -> Optional[str]:
    """None when MLServer's environment is built, else why not."""
    binary = MLSERVER_VENV / "bin" / "mlserver"
    if not binary.exists():
        return f"no MLServer environment at {MLSERVER_VENV.relative_to(REPO)} (build it: python -m bench.peers --build-mlserver)"
    return None


def build_mlserver() -> None:
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(MLSERVER_VENV)], check=True)
    for pins in MLSERVER_PINS:
        proc = subprocess.run([str(MLSERVER_VENV / "bin" / "pip"), "install", "-q", *pins], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = [line for line in (proc.stderr or proc.stdout).splitlines() if "is ignored" not in line][-5:]
            raise RuntimeError(f"pip install {' '.join(pins)} exited {proc.returncode}: {' | '.join(tail)}")
    if mlserver_missing():
        raise RuntimeError(f"pip finished but {mlserver_missing()}")


def ensure_mlserver(say: Callable[[str], None] = print) -> Optional[str]:
    """Build MLServer's environment when it is missing; None when it is ready, else why it is not."""
    missing = mlserver_missing()
    if missing is None:
        return None
    say(f"[bench] {missing}: building it now (pip, a few minutes, once)")
    try:
        build_mlserver()
    except Exception as exc:  # no package index, a failed wheel: MLServer is reported as not measured, with this
        return f"building its environment failed: {type(exc).__name__}: {str(exc)[-400:]}"
    return None


def mlserver(lab: Lab, threads: int = 1, workers: int = 0) -> Peer:
    name = config_name("mlserver", {"threads": threads, "workers": workers})
    model_dir, tokenizer_dir = artifact_dirs(lab)
    root = lab.run_dir / name
    (root / "clf").mkdir(parents=True, exist_ok=True)
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (root / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": grpc_port, "metrics_port": metrics_port, "host": "127.0.0.1",
        "parallel_workers": workers, "debug": False, "metrics_endpoint": None,
    }))
    (root / "clf" / "model-settings.json").write_text(json.dumps({
        "name": "clf", "implementation": "bench.mlserver_runtime.PaddedHuggingFaceRuntime",
        "max_batch_size": MLSERVER_MAX_BATCH, "max_batch_time": MLSERVER_MAX_BATCH_TIME,
        "parameters": {"extra": {"task": "text-classification", "pretrained_model": str(model_dir),
                                 "pretrained_tokenizer": str(tokenizer_dir), "device": -1,
                                 "intra_op_threads": threads}},
    }))
    env = {**QUIET_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO), "PATH": f"{MLSERVER_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    argv = [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(root)]
    server = ManagedServer(name, argv, port, lab.log_dir, env=env, cwd=root,
                           ready=http_ok(f"http://127.0.0.1:{port}/v2/models/clf/ready"), start_timeout=300)
    lab.own(server).start()

    def body(text: str) -> bytes:
        return json.dumps({"inputs": [{"name": "array_inputs", "shape": [1], "datatype": "BYTES", "data": [text]}]}).encode()

    def label(answer: Any) -> str:
        data = answer["outputs"][0]["data"][0]
        value = json.loads(data) if isinstance(data, str) else data
        return (value[0] if isinstance(value, list) else value)["label"]

    return Peer(name, server, "/v2/models/clf/infer", body, label)


if __name__ == "__main__":
    if "--build-mlserver" in sys.argv:
        build_mlserver()
        print(mlserver_missing() or f"MLServer environment ready at {MLSERVER_VENV}")
