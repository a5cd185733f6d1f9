"""Rebuild data/cifar10-demo from the full CIFAR-10 JPEG archive (run by hand; the result is committed).

    python data/make_cifar10_demo.py ../shared/data/cifar10-jpeg.tar.gz data/cifar10-demo

Takes, per class and with a fixed seed, 500 images of the official train split (the database, also
used to train the demo encoder) and 100 of the official test split (the queries). Files are copied
byte for byte, keeping their original names.
"""
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PER_CLASS = {"database": ("train", 500), "query": ("test", 100)}
SEED = 0


def main(archive: str, out: str) -> None:
    out_dir = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        rng = np.random.default_rng(SEED)
        for split, (official, n) in PER_CLASS.items():
            for class_dir in sorted(Path(tmp, official).iterdir()):
                files = sorted(class_dir.glob("*.jpg"))
                chosen = sorted(rng.choice(len(files), size=n, replace=False))
                target = out_dir / split / class_dir.name
                target.mkdir(parents=True, exist_ok=True)
                for i in chosen:
                    shutil.copyfile(files[i], target / files[i].name)


if __name__ == "__main__":
    main(*sys.argv[1:3])
