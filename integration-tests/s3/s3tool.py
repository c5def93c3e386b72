#!/usr/bin/env python3
"""A plain S3 client (boto3) for tests and benchmarks: puts and gets what Granary reads
and writes, independently of Granary's own S3 code. Endpoint and keys come from the AWS
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).

  s3tool.py mb BUCKET
  s3tool.py put-tree DIR BUCKET PREFIX      upload every file under DIR
  s3tool.py put BUCKET KEY FILE             upload one file
  s3tool.py get-tree BUCKET PREFIX DIR      download every object under PREFIX
  s3tool.py ls BUCKET PREFIX                print "size key" per object
  s3tool.py read-all BUCKET PREFIX THREADS  GET every object, print "files bytes seconds"
"""
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config


def client(threads=10):
    return boto3.client(
        "s3",
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(max_pool_connections=max(10, threads)),
    )


def keys(s3, bucket, prefix):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for o in page.get("Contents", []):
            yield o["Key"], o["Size"]


def rel(key, prefix):
    return key[len(prefix):].lstrip("/")


def main(argv):
    cmd, args = argv[1], argv[2:]
    s3 = client()
    if cmd == "mb":
        s3.create_bucket(Bucket=args[0])
    elif cmd == "put-tree":
        src, bucket, prefix = args
        for root, _, files in os.walk(src):
            for f in files:
                path = os.path.join(root, f)
                key = os.path.join(prefix, os.path.relpath(path, src)).lstrip("/")
                with open(path, "rb") as body:
                    s3.put_object(Bucket=bucket, Key=key, Body=body.read())
    elif cmd == "put":
        bucket, key, path = args
        with open(path, "rb") as body:
            s3.put_object(Bucket=bucket, Key=key, Body=body.read())
    elif cmd == "get-tree":
        bucket, prefix, dst = args
        for key, _ in keys(s3, bucket, prefix):
            path = os.path.join(dst, rel(key, prefix))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    elif cmd == "ls":
        bucket, prefix = args
        for key, size in keys(s3, bucket, prefix):
            print(size, key)
    elif cmd == "read-all":
        bucket, prefix, threads = args[0], args[1], int(args[2])
        s3 = client(threads)
        todo = [k for k, _ in keys(s3, bucket, prefix)]
        start = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(
                lambda k: len(s3.get_object(Bucket=bucket, Key=k)["Body"].read()), todo))
        print(len(todo), sum(sizes), time.monotonic() - start)
    else:
        sys.exit(f"unknown command {cmd}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
