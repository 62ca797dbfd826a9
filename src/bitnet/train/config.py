"""What a run is told: :class:`TrainConfig` (validated field by field), the optimizer it implies, and the
config stored in a run folder read back for a resume."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import CONFIG_FILE, CheckpointError, read_config
from ..nn.feedforward import ACTIVATIONS
from ..nn.layers import WEIGHTS_CHOICES
from .data import DEFAULT_PATTERNS


@dataclass
class TrainConfig:
    """Everything a run needs. Model shape fields are ignored on resume (the checkpoint's shape wins).

    Data: ``data`` is ``"default"`` (embedded KJV Bible, else Python stdlib source), ``"kjv"``,
    ``"stdlib"``, an enwik8 file, a text file or a folder (see :mod:`bitnet.train.data`).
    Schedule: :class:`~bitnet.train.schedule.TwoStageSchedule` (warmup, peak LR with weight decay for
    ``stage_split`` of the run, then a lower cosine-decayed LR without weight decay).
    """

    data: str | list = "default"           # a spec (see bitnet.train.data) or a list of text files
    out: str | None = None                 # run folder; default runs/<timestamp>
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    # model
    dim: int = 256
    depth: int = 4
    heads: int = 4
    kv_heads: int | None = None
    ff_mult: float = 4.0
    weights: str = "1.58"                  # "1.58" ternary, "1" binary, "fp" nn.Linear baseline
    bits: int = 8
    activation: str = "silu"
    tie_embeddings: bool = False
    dropout: float = 0.0
    # optimisation (paper recipe)
    lr: float = 1.5e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int | None = None        # default: min(100, steps // 10)
    stage_split: float = 0.5
    stage2_lr_ratio: float = 0.4
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 0                    # 0: only at the end (and on Ctrl-C)
    log_every: int = 10
    val_fraction: float = 0.05
    patterns: tuple = DEFAULT_PATTERNS
    # runtime
    device: str = "auto"
    threads: int | None = None             # torch CPU threads (None: torch's default)
    amp: str = "auto"                      # "auto" (bf16 on CUDA), "bf16", "off"
    fsdp: bool = False                     # under torchrun: shard with FSDP (fully_shard) instead of DDP
    seed: int = 0
    resume: bool = False
    stop_at: int | None = None             # stop after this step (schedule unchanged); resume later
    max_time: float | None = None          # stop after this many seconds of training (checkpointed)
    progress: bool = True
    plot: bool = True

    def validate(self) -> None:
        """ValueError naming the field and what is allowed, for every setting of the wrong type or range."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def need(name, ok, allowed):
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}"[:300])

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "dim", "depth", "heads", "eval_batches",
                     "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("eval_every", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {v!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be one of ('auto', 'bf16', 'off'), got {self.amp!r}")
        need("lr", lambda v: number(v) and v > 0, "a number > 0")
        need("grad_clip", lambda v: v is None or (number(v) and v >= 0), "a number >= 0 (0 = off)")
        if self.stop_at is not None and not (isinstance(self.stop_at, int) and 0 < self.stop_at <= self.steps):
            raise ValueError(f"stop_at must be in [1, steps={self.steps}], got {self.stop_at!r}")
        need("data", lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and v
                                                     and all(isinstance(f, str) for f in v)),
             "a data spec (a string) or a list of text files")
        need("out", lambda v: v is None or isinstance(v, str), "a folder name or null")
        need("weights", lambda v: v in WEIGHTS_CHOICES, f"one of {WEIGHTS_CHOICES}")
        need("activation", lambda v: v in ACTIVATIONS, f"one of {ACTIVATIONS}")
        need("bits", lambda v: isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 8, "an integer in 2..8")
        need("kv_heads", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
             "null or a positive integer")
        need("ff_mult", lambda v: number(v) and v > 0, "a number > 0")
        need("dropout", lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)")
        need("tie_embeddings", lambda v: isinstance(v, bool), "true or false")
        need("betas", lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(number(b) and 0 <= b < 1 for b in v),
             "two numbers in [0, 1)")
        for name in ("weight_decay", "min_lr_ratio", "stage2_lr_ratio"):
            need(name, lambda v: number(v) and v >= 0, "a number >= 0")
        need("stage_split", lambda v: number(v) and 0 <= v <= 1, "a number in [0, 1]")
        need("warmup_steps", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
             "null or an integer >= 0")
        need("val_fraction", lambda v: number(v) and 0 < v < 1, "a number in (0, 1)")
        need("patterns", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
             "a list of file name patterns")
        need("device", lambda v: isinstance(v, str), "a device name ('auto', 'cpu', 'cuda', ...)")
        need("threads", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
             "null or an integer >= 1")
        need("seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63,
             "an integer in [0, 2**63)")
        need("max_time", lambda v: v is None or (number(v) and v >= 0), "null or a number of seconds >= 0")
        for name in ("fsdp", "resume", "progress", "plot"):
            need(name, lambda v: isinstance(v, bool), "true or false")

    def model_kwargs(self, vocab_size: int) -> dict:
        return dict(num_tokens=vocab_size, dim=self.dim, depth=self.depth, heads=self.heads, ff_mult=self.ff_mult,
                    kv_heads=self.kv_heads, max_seq_len=self.seq_len, weights=self.weights, bits=self.bits,
                    dropout=self.dropout, activation=self.activation, tie_embeddings=self.tie_embeddings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: matrices (decayed) and vectors such as norm gains (never decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))


def config_from_run(run_dir, **overrides: Any) -> TrainConfig:
    """The TrainConfig stored in a run folder's config.json, with ``overrides`` applied (for resuming).

    The stored settings are validated on their own first, so that an error names the file and the field."""
    cfg_file = Path(run_dir) / CONFIG_FILE
    saved = read_config(run_dir).get("train_config", {})     # read_config checks that it is an object
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    once = ("stop_at", "max_time", "resume")                 # per-invocation settings are not inherited
    kwargs = {k: v for k, v in saved.items() if k in known and k not in once}
    for k in ("betas", "patterns"):
        if isinstance(kwargs.get(k), list):
            kwargs[k] = tuple(kwargs[k])
    try:
        TrainConfig(**kwargs).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: train_config.{e}" if str(e).split(" ")[0] in known
                              else f"{cfg_file}: train_config: {e}") from e
    kwargs.update(overrides)
    return TrainConfig(**kwargs)
