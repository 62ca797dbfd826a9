"""examples/mnist.py reads real IDX files (raw and gzip) and trains both MLPs side by side."""

import gzip
import runpy
import struct
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist.py"


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_example_on_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    # a learnable toy: class c lights up the c-th band of rows of a 28x28 image
    def make(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 3] = 255
        return images, labels
    train_x, train_y = make(300)
    test_x, test_y = make(100)
    write_idx(tmp_path / "train-images-idx3-ubyte", train_x, gz)
    write_idx(tmp_path / "train-labels-idx1-ubyte", train_y, gz)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x, gz)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, gz)
    main = runpy.run_path(str(EXAMPLE))["main"]
    results = main(["--data", str(tmp_path), "--epochs", "3", "--hidden", "64", "--batch-size", "32", "--threads", "1"])
    assert set(results) == {"BitLinear (b1.58)", "nn.Linear (fp32)"}
    assert results["BitLinear (b1.58)"] > 80 and results["nn.Linear (fp32)"] > 80


def test_bad_idx_file_is_named(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    read_idx = runpy.run_path(str(EXAMPLE))["read_idx"]
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
