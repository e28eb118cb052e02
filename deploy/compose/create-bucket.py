"""Create the S3 bucket of VPT_STORE (s3://bucket/prefix) if it does not exist, then exit.

Run once by the compose `minio-init` service with the vpt-serve image (boto3 is already there), so the
scale profile needs no MinIO client image. Waits for the object store to answer (it may still be
starting), is idempotent, and exits non-zero with a message when it cannot finish, which keeps the
replicas (depends_on: service_completed_successfully) from starting against a missing bucket.

Environment: VPT_STORE, VPT_S3_ENDPOINT_URL (optional), AWS_REGION, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY; VPT_BUCKET_WAIT_S (default 60).
"""

from __future__ import annotations

import os
import sys
import time
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


def main() -> int:
    url = urlparse(os.environ["VPT_STORE"])
    if url.scheme != "s3" or not url.netloc:
        print(f"VPT_STORE must be s3://bucket[/prefix], got {os.environ['VPT_STORE']!r}", file=sys.stderr)
        return 2
    bucket = url.netloc
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ.get("VPT_S3_ENDPOINT_URL") or None,
        region_name=region,
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + float(os.environ.get("VPT_BUCKET_WAIT_S", "60"))
    while True:
        try:
            s3.head_bucket(Bucket=bucket)
            print(f"bucket {bucket} exists")
            return 0
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound"):
                error: Exception = e
            else:
                try:
                    extra = {} if region == "us-east-1" else {"LocationConstraint": region}
                    s3.create_bucket(Bucket=bucket, **({"CreateBucketConfiguration": extra} if extra else {}))
                    print(f"created bucket {bucket}")
                    return 0
                except ClientError as e2:
                    if e2.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou",):
                        return 0
                    error = e2
        except BotoCoreError as e:  # not reachable yet
            error = e
        if time.monotonic() > deadline:
            print(f"cannot create bucket {bucket}: {error}", file=sys.stderr)
            return 1
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
