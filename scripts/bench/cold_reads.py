#!/usr/bin/env python3
"""Cold reads of a big file: its first byte, then random reads, raw vs Granary.

Per run: the file on the local disk (page cache dropped), then each Granary build named
with --build (a fresh `granary local` over the file's directory: empty worker cache, page
cache dropped): the time to read the first 4 KiB, then `--random` reads of 128 KiB at
random offsets past the first block, one after another (a reader of samples inside big
files: the first epoch is cold). With --s3, the same file as an object in moto (started
here, needs `pip install 'moto[server]' boto3`) read by a plain client (boto3 ranged GETs)
and through `granary local --ufs s3://` (a smaller object: --s3-size). Milliseconds: lower
is better.

    sudo python3 scripts/bench/cold_reads.py [--size 2GiB] [--runs 3] [--s3] \\
        [--build granary=target/release/granary] [--write-docs docs/BENCHMARKS.md]
"""

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import GranaryLocal, drop_page_cache, granary_binary, machine, write_docs

BLOCK = 64 << 20
FIRST = 4096
SAMPLE = 128 << 10
BUCKET, KEY = "cold", "ds/big.bin"


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def offsets(size: int, count: int, seed: int) -> list:
    rng = random.Random(seed)
    return [rng.randrange(BLOCK, size - SAMPLE) & ~4095 for _ in range(count)]


def read_file(path: Path, offs: list) -> dict:
    """Milliseconds to the first 4 KiB, and the median and total of the random reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        if len(os.pread(fd, FIRST, 0)) != FIRST:
            raise RuntimeError(f"{path}: short read")
        first = time.perf_counter() - start
        took = []
        for o in offs:
            start = time.perf_counter()
            if len(os.pread(fd, SAMPLE, o)) != SAMPLE:
                raise RuntimeError(f"{path}: short read at {o}")
            took.append(time.perf_counter() - start)
    finally:
        os.close(fd)
    return {"first": first * 1e3, "median": statistics.median(took) * 1e3,
            "total": sum(took) * 1e3}


def dataset(directory: Path, size: int) -> Path:
    """`directory`/big.bin of `size` random bytes (kept between runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    big = directory / "big.bin"
    if not big.exists() or big.stat().st_size != size:
        print(f"writing {size >> 20} MiB to {big} ...", file=sys.stderr)
        with open(big, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
    return big


class Moto:
    """moto's S3 server on a free port, holding `file` as s3://cold/ds/big.bin."""

    def __init__(self, work: Path, file: Path):
        import boto3

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
        self.log = open(work / "moto.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="bench", aws_secret_access_key="bench")
        deadline = time.time() + 30
        while True:
            try:
                self.client.list_buckets()
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    sys.exit("moto did not start; see moto.log")
                time.sleep(0.3)
        self.client.create_bucket(Bucket=BUCKET)
        self.client.upload_file(str(file), BUCKET, KEY)

    def read(self, offs: list) -> dict:
        """`read_file`'s figures for ranged GETs of the object."""
        def get(offset, length):
            start = time.perf_counter()
            body = self.client.get_object(
                Bucket=BUCKET, Key=KEY, Range=f"bytes={offset}-{offset + length - 1}")["Body"]
            if len(body.read()) != length:
                raise RuntimeError("short GET")
            return time.perf_counter() - start

        first = get(0, FIRST)
        took = [get(o, SAMPLE) for o in offs]
        return {"first": first * 1e3, "median": statistics.median(took) * 1e3,
                "total": sum(took) * 1e3}

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        self.log.close()


def table(results: dict, baseline: str, count: int) -> str:
    def med(target, key):
        return statistics.median(r[key] for r in results[target])

    rows = [(f"first {FIRST // 1024} KiB of a cold file, ms", "first"),
            (f"{count} random reads of {SAMPLE >> 10} KiB, median, ms", "median"),
            (f"{count} random reads of {SAMPLE >> 10} KiB, all, ms", "total")]
    targets = [t for t in results if t != baseline]
    out = [f"| case | {baseline} | " + " | ".join(f"{t} | /{baseline}" for t in targets) + " |",
           "|---|---:|" + "---:|---:|" * len(targets)]
    for label, key in rows:
        base = med(baseline, key)
        cells = " | ".join(f"{med(t, key):.1f} | {med(t, key) / base:.3g}x" for t in targets)
        out.append(f"| {label} | {base:.1f} | {cells} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/granary-cold-reads"),
                   help="work directory (the file, mounts, state); the file is kept between runs")
    p.add_argument("--size", default="2GiB", help="the file's size")
    p.add_argument("--random", type=int, default=48, help="random reads per run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--build", action="append", default=[],
                   help="NAME=PATH of a granary binary (repeat to compare builds in the same runs)")
    p.add_argument("--s3", action="store_true", help="also over S3 (moto, started here)")
    p.add_argument("--s3-size", default="512MiB",
                   help="the S3 object's size (moto copies the whole object for every GET)")
    p.add_argument("--write-docs", type=Path)
    a = p.parse_args()
    builds = dict(b.split("=", 1) for b in a.build) or {"granary": granary_binary()}
    size, s3_size = parse_size(a.size), parse_size(a.s3_size)
    if min(size, s3_size) < BLOCK + SAMPLE:
        sys.exit(f"sizes must be over {BLOCK >> 20} MiB: the random reads are past the first block")
    big = dataset(a.dir / "ufs", size)
    if not drop_page_cache():
        print("not root: the page cache is not dropped, raw reads are warm", file=sys.stderr)

    # Per section: the file's size, the baseline's name and reads, what `granary local`
    # mounts and its environment.
    sections = {"local": (size, "raw", lambda offs: read_file(big, offs), str(big.parent), {})}
    moto = Moto(a.dir, dataset(a.dir / "s3", s3_size)) if a.s3 else None
    if moto:
        sections["s3"] = (s3_size, "plain S3 client", moto.read, f"s3://{BUCKET}/ds", moto.env)
    results = {}
    try:
        for section, (file_size, baseline, read_baseline, target, env) in sections.items():
            got = results[section] = {baseline: [], **{name: [] for name in builds}}
            for run in range(a.runs):
                offs = offsets(file_size, a.random, run)
                drop_page_cache()
                got[baseline].append(read_baseline(offs))
                for name, binary in builds.items():
                    g = GranaryLocal(target, a.dir, binary=binary, env=env)
                    try:
                        os.listdir(g.mnt)
                        drop_page_cache()
                        got[name].append(read_file(g.mnt / "big.bin", offs))
                    finally:
                        g.stop()
                print(f"{section} run {run + 1} of {a.runs}: " + ", ".join(
                    f"{t} {r[-1]['first']:.1f}/{r[-1]['median']:.1f}/{r[-1]['total']:.0f} ms"
                    for t, r in got.items()), file=sys.stderr)
    finally:
        if moto:
            moto.stop()

    tables = {s: table(results[s], sections[s][1], a.random) for s in sections}
    for s, t in tables.items():
        print(f"\n{s}:\n{t}")
    if a.write_docs:
        command = (f"`python3 scripts/bench/cold_reads.py --size {a.size} --random {a.random} "
                   f"--runs {a.runs}{f' --s3 --s3-size {a.s3_size}' if a.s3 else ''}"
                   + "".join(f" --build {b}" for b in a.build) + "`")
        body = (f"Machine: {machine()}. One file of {size >> 20} MiB; Granary: a fresh "
                f"`granary local` per run and build (empty worker cache), page cache dropped "
                f"before each target. Milliseconds (lower is better), medians of {a.runs} runs.\n\n"
                f"Command: {command}\n\nLocal directory:\n\n{tables['local']}\n")
        if "s3" in tables:
            body += (f"\nS3 (an object of {s3_size >> 20} MiB in moto on this machine; `granary "
                     f"local --ufs s3://`, the default `[s3]` settings):\n\n{tables['s3']}\n")
        write_docs(a.write_docs, "cold-reads", body)


if __name__ == "__main__":
    main()
