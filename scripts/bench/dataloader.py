#!/usr/bin/env python3
"""A real PyTorch DataLoader over Granary vs the raw directory, side by side.

Generates an image dataset (JPEG files in class folders, ImageNet-like sizes), then per
run: the raw directory and fresh `granary local` mounts over it (empty worker cache,
metadata not yet loaded), one writable (the default) and one read-only (as a dataset is
mounted; FUSE passthrough is on there by default), each read two epochs with
DataLoader(num_workers=N); every sample is read whole and decoded with PIL. Runs alternate
raw / Granary / Granary read-only; the table has medians. As root the page cache is dropped before each first epoch, so that epoch reads
the disk (raw) or the UFS through the worker (Granary); second epochs are warm.

    pip install torch pillow numpy       # PyPI; CPU is enough
    sudo python3 scripts/bench/dataloader.py [--files 20000] [--runs 3] [--write-docs docs/BENCHMARKS.md]
"""

import argparse
import os
import shutil
import statistics
import sys
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchlib import GranaryLocal, drop_page_cache, machine, write_docs


def make_image(args):
    path, seed, side = args
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: compresses like a photo (~80 KiB at 320x320, q 90).
    y, x = np.mgrid[0:side, 0:side]
    base = np.stack([(x * (c + 1) + y * (3 - c)) % 256 for c in range(3)], axis=-1)
    noise = rng.integers(0, 96, size=(side, side, 3))
    img = Image.fromarray(((base + noise) % 256).astype(np.uint8))
    img.save(path, "JPEG", quality=90)


def generate(data: Path, files: int, classes: int, side: int):
    marker = data / ".params"
    params = f"files={files} classes={classes} side={side}\n"
    if marker.exists() and marker.read_text() == params:
        return
    shutil.rmtree(data, ignore_errors=True)
    jobs = []
    for i in range(files):
        d = data / f"class_{i % classes:04d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"img_{i:07d}.jpg"), i, side))
    print(f"generating {files} JPEG files in {data} ...", file=sys.stderr)
    with Pool(os.cpu_count()) as pool:
        for done, _ in enumerate(pool.imap_unordered(make_image, jobs, chunksize=64), 1):
            if done % 2000 == 0 or done == files:
                print(f"\r  {done}/{files}", end="", file=sys.stderr)
    print(file=sys.stderr)
    marker.write_text(params)


class ImageFiles(Dataset):
    """ImageFolder-like: (decoded image as a CHW uint8 tensor, class index)."""

    def __init__(self, root: Path, side: int):
        self.side = side
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = []
        for c, name in enumerate(classes):
            for e in os.scandir(root / name):
                if e.name.endswith(".jpg"):
                    self.samples.append((e.path, c))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with open(path, "rb") as f:
            img = Image.open(f)
            img = img.convert("RGB").resize((self.side, self.side))
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label


def epoch(dataset, workers: int, batch: int, seed: int) -> float:
    g = torch.Generator()
    g.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, generator=g)
    start = time.perf_counter()
    seen = 0
    for images, _ in loader:
        seen += images.shape[0]
    took = time.perf_counter() - start
    if seen != len(dataset):
        raise RuntimeError(f"epoch saw {seen} samples, not {len(dataset)}")
    return seen / took


def two_epochs(root: Path, a) -> dict:
    dropped = drop_page_cache()
    start = time.perf_counter()
    dataset = ImageFiles(root, a.decode_side)
    listing = len(dataset) / (time.perf_counter() - start)
    if len(dataset) != a.files:
        raise RuntimeError(f"{root} lists {len(dataset)} samples, not {a.files}")
    first = epoch(dataset, a.workers, a.batch, 1)
    second = epoch(dataset, a.workers, a.batch, 2)
    return {"listing": listing, "first": first, "second": second, "dropped": dropped}


def table(results, a) -> str:
    def med(target, key):
        return statistics.median(r[key] for r in results[target])

    rows = [
        ("listing the dataset, files/s", "listing"),
        ("epoch 1, samples/s", "first"),
        ("epoch 2, samples/s", "second"),
    ]
    targets = [t for t in results if t != "raw"]
    out = ["| case | raw | " + " | ".join(f"{t} | /raw" for t in targets) + " |",
           "|---|---:|" + "---:|---:|" * len(targets)]
    for label, key in rows:
        raw = med("raw", key)
        cells = " | ".join(f"{med(t, key):.0f} | {med(t, key) / raw:.2f}x" for t in targets)
        out.append(f"| {label} | {raw:.0f} | {cells} |")
    return "\n".join(out)


def machine_with_gpu() -> str:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return machine(gpu)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/granary-dataloader"),
                   help="work directory (dataset, mount, state); the dataset is kept between runs")
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--image-side", type=int, default=320,
                   help="stored JPEG width and height (320: ~80 KiB files)")
    p.add_argument("--decode-side", type=int, default=224, help="side each sample is resized to")
    p.add_argument("--workers", type=int, default=8, help="DataLoader num_workers")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--write-docs", type=Path)
    a = p.parse_args()
    # More workers than cores is the point here (they wait on reads), not a mistake.
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    data = a.dir / "ufs"
    generate(data, a.files, a.classes, a.image_side)
    size = sum(e.stat().st_size for d in os.scandir(data) if d.is_dir() for e in os.scandir(d))
    mounts = {
        "granary": "",
        "granary, read-only": "read_only = true\n",
        "granary, read-only, open_in_kernel": "read_only = true\nopen_in_kernel = true\n",
    }
    results = {"raw": [], **{name: [] for name in mounts}}
    for run in range(a.runs):
        print(f"run {run + 1} of {a.runs}: raw ...", file=sys.stderr)
        results["raw"].append(two_epochs(data, a))
        for name, mount_config in mounts.items():
            print(f"run {run + 1} of {a.runs}: {name} ...", file=sys.stderr)
            g = GranaryLocal(str(data), a.dir, mount_config)
            try:
                results[name].append(two_epochs(g.mnt, a))
            finally:
                g.stop()
        for target in results:
            r = results[target][-1]
            print(f"  {target}: listing {r['listing']:.0f}/s, epoch 1 {r['first']:.0f}/s, "
                  f"epoch 2 {r['second']:.0f}/s", file=sys.stderr)
    t = table(results, a)
    dropped = results["raw"][0]["dropped"]
    print(t)
    if a.write_docs:
        cache = ("page cache dropped before each first epoch" if dropped
                 else "page cache not dropped (not root)")
        body = (
            f"Machine: {machine_with_gpu()}. Dataset: {a.files} JPEG files in {a.classes} folders, "
            f"{size / a.files / 1024:.0f} KiB each on average ({size / 2**30:.2f} GiB). "
            f"Each sample is read whole and decoded with PIL, resized to {a.decode_side}x{a.decode_side}; "
            f"DataLoader(batch_size={a.batch}, shuffle=True, num_workers={a.workers}); torch {torch.__version__}. "
            f"Granary: a fresh `granary local` per run over the dataset's directory (empty worker "
            f"cache, metadata loaded by the first listing), writable (the default) and read-only "
            f"(`read_only = true`, where FUSE passthrough is on by default), and read-only with "
            f"`open_in_kernel = true` (zero-message opens); {cache}. Listing: building the "
            f"sample list (scandir of every folder).\n\n"
            f"Command: `python3 scripts/bench/dataloader.py --files {a.files} --workers {a.workers} "
            f"--runs {a.runs}` (median of {a.runs} alternating runs)\n\n{t}\n"
        )
        write_docs(a.write_docs, "dataloader", body)


if __name__ == "__main__":
    main()
