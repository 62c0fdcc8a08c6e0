# The repository's training side: the reference training API (`python -m training.api`) and the
# demo model's trainer and publisher (`python -m training.demo`). Built from the repository root
# (compose: context .., this file); CPU-only torch, every version from requirements.lock.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY registry ./registry
COPY runners ./runners
COPY training ./training
RUN pip install --no-cache-dir -c requirements.lock .
EXPOSE 8002
CMD ["python", "-m", "training.api", "--host", "0.0.0.0", "--port", "8002"]
