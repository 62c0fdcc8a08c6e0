# MLflow's tracking server and registry with PostgreSQL and S3 support, plus the stack's one-shot
# scripts (bucket, webhook). mlflow and boto3 as pinned in requirements.lock (tests/test_deploy.py checks).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true
RUN pip install --no-cache-dir mlflow==3.17.2 boto3==1.44.8 psycopg2-binary==2.9.13
COPY create_bucket.py create_webhook.py /opt/deploy/
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"]
