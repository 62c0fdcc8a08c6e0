"""Create the artifact bucket once the S3 endpoint answers; exit 0 when it exists (compose's one-shot job).

    python create_bucket.py [BUCKET]      # endpoint from MLFLOW_S3_ENDPOINT_URL, keys from AWS_*
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


def ensure_bucket(bucket: str, endpoint: str | None, wait_s: float = 120.0) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint or None,
                      config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    deadline = time.monotonic() + wait_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            s3.head_bucket(Bucket=bucket)
            return "exists"
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                s3.create_bucket(Bucket=bucket)
                return "created"
            last = exc  # e.g. 503 while the server starts
        except BotoCoreError as exc:  # not listening yet
            last = exc
        time.sleep(1)
    raise SystemExit(f"S3 at {endpoint or 'AWS'} did not answer within {wait_s:.0f}s: {last}")


def main(argv: list[str]) -> int:
    bucket = argv[1] if len(argv) > 1 else "artifacts"
    what = ensure_bucket(bucket, os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    print(f"bucket {bucket}: {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
