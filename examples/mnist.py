"""BitLinear MLP vs the same MLP with nn.Linear on MNIST-format data, same recipe, same seed.

    python examples/mnist.py                      # Fashion-MNIST from Debian if present, else sklearn digits
    python examples/mnist.py --data ~/mnist       # a folder with train-images-idx3-ubyte(.gz) etc.

Prints the test accuracy of both models side by side.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bitnet import BitLinear

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzip): magic (0, 0, dtype=0x08 ubyte, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {zero:#x}, type {dtype:#x})")
        dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} bytes, its header promises {int(np.prod(dims))}")
    return data.reshape(dims)


def find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no {stem}[.gz] in {folder}")


def load_data(data: str | None):
    """Returns (name, train_x, train_y, test_x, test_y) as float tensors in [0, 1] and int64 labels."""
    folder = Path(data) if data else (DEBIAN_FASHION_MNIST if DEBIAN_FASHION_MNIST.exists() else None)
    if folder is not None:
        arrays = {key: read_idx(find_idx(folder, stem)) for key, stem in IDX_FILES.items()}
        x = {k: torch.from_numpy(arrays[k].reshape(len(arrays[k]), -1).astype(np.float32) / 255.0)
             for k in ("train_x", "test_x")}
        y = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("train_y", "test_y")}
        return str(folder), x["train_x"], y["train_y"], x["test_x"], y["test_y"]
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    return "scikit-learn digits (8x8)", x[:cut], y[:cut], x[cut:], y[cut:]


def make_mlp(inputs: int, hidden: int, classes: int, bit: bool) -> nn.Module:
    linear = (lambda i, o: BitLinear(i, o, bias=True)) if bit else (lambda i, o: nn.Linear(i, o))
    return nn.Sequential(linear(inputs, hidden), nn.ReLU(), linear(hidden, classes))


def train_and_test(model, train_x, train_y, test_x, test_y, epochs, batch_size, lr, seed) -> float:
    """AdamW + one-cycle schedule; returns the test accuracy in percent."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    steps = epochs * ((len(train_x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train_x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(test_x).argmax(-1) == test_y).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder with MNIST-format IDX files (raw or .gz)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    name, train_x, train_y, test_x, test_y = load_data(args.data)
    classes = int(max(train_y.max(), test_y.max())) + 1
    print(f"data: {name}: {len(train_x)} train / {len(test_x)} test, {train_x.shape[1]} features, {classes} classes",
          flush=True)
    results = {}
    for label, bit in (("BitLinear (b1.58)", True), ("nn.Linear (fp32)", False)):
        torch.manual_seed(args.seed)
        model = make_mlp(train_x.shape[1], args.hidden, classes, bit)
        start = time.time()
        results[label] = train_and_test(model, train_x, train_y, test_x, test_y, args.epochs, args.batch_size,
                                        args.lr, args.seed)
        print(f"{label:20s} test accuracy {results[label]:6.2f}%   ({time.time() - start:.0f} s)", flush=True)
    bit_acc, fp_acc = results["BitLinear (b1.58)"], results["nn.Linear (fp32)"]
    print(f"difference (fp32 - b1.58): {fp_acc - bit_acc:+.2f} points")
    return results


if __name__ == "__main__":
    main()
