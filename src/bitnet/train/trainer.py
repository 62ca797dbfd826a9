"""The training loop: ``train(TrainConfig(...)) -> result dict``.

One run folder holds everything (see :mod:`bitnet.io` for the checkpoint files)::

    out/config.json, model.safetensors, optimizer.safetensors   checkpoint (atomic saves)
    out/log.csv     step, lr, train_loss, val_loss, val_bpb, tokens_per_s, elapsed
    out/loss.png    loss curves (when matplotlib is installed)

``resume=True`` continues a run from its folder: model, optimizer, step, RNG states (torch and the
data sampler) are restored and the schedule goes on where it stopped, so a run split by
``stop_at`` + resume ends with the same weights as an uninterrupted one (on the same device).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, load_optimizer, load_state_into, read_config,
                  read_state_dict, resolve_device, save_checkpoint)
from ..models import BitNetTransformer
from ..tokenizer import ByteTokenizer
from .data import DEFAULT_PATTERNS, Corpus, get_batch, load_corpus
from .schedule import TwoStageSchedule

LOG_FIELDS = ("step", "lr", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "elapsed")


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
    seed: int = 0
    resume: bool = False
    stop_at: int | None = None             # stop after this step (schedule unchanged); resume later
    max_time: float | None = None          # stop after this many seconds of training (checkpointed)
    progress: bool = True
    plot: bool = True

    def validate(self) -> None:
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
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be in [1, steps={self.steps}], got {self.stop_at!r}")

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


@torch.no_grad()
def evaluate(model: nn.Module, data, cfg: TrainConfig, device, autocast) -> float:
    """Mean validation loss (nats/token) on ``eval_batches`` fixed windows (same windows every call)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = get_batch(data, cfg.batch_size, cfg.seq_len, gen, device)
        with autocast():
            total += float(model.loss(x, y))
    model.train(was_training)
    return total / cfg.eval_batches


def _rng_states(data_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    states = {"data": data_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(states: dict[str, torch.Tensor], data_gen: torch.Generator, device: torch.device) -> None:
    data_gen.set_state(states["data"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def plot_log(log_path: Path, out_path: Path) -> Path | None:
    """Loss curves (train and validation, nats) from log.csv as a PNG; None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_path.open()))
    tr = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    va = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(log_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


class _CSVLog:
    def __init__(self, path: Path):
        new = not path.exists() or path.stat().st_size == 0
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        if new:
            self.writer.writeheader()

    def write(self, **row) -> None:
        self.writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _build(cfg: TrainConfig, run_dir: Path, device: torch.device, tokenizer) -> tuple:
    """Model, optimizer, start step, train state and restored RNG tensors (fresh or from ``run_dir``)."""
    has_ckpt = (run_dir / CONFIG_FILE).is_file()
    if cfg.resume and not has_ckpt:
        raise FileNotFoundError(f"resume=True but {run_dir} has no checkpoint ({CONFIG_FILE})")
    if not cfg.resume and has_ckpt:
        raise FileExistsError(f"{run_dir} already holds a checkpoint; pass resume=True to continue it "
                              "or choose another out folder")
    if not cfg.resume:
        model = BitNetTransformer(**cfg.model_kwargs(tokenizer.vocab_size)).to(device)
        return model, make_optimizer(model, cfg), 0, {}, None
    saved = read_config(run_dir)
    model = BitNetTransformer(**saved["model_config"])
    tensors, meta = read_state_dict(run_dir / saved["files"]["model"])
    load_state_into(model, tensors, json.loads(meta.get("bitnet.aliases", "{}")), run_dir / MODEL_FILE)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    rng = load_optimizer(optimizer, run_dir / OPTIMIZER_FILE)
    return model, optimizer, int(saved["train_state"]["step"]), saved["train_state"], rng


def train(config: TrainConfig | None = None, **overrides: Any) -> dict:
    """Train a BitNetTransformer on bytes. Returns a dict: ``run_dir``, ``steps``, ``final_train_loss``,
    ``final_val_loss``, ``final_val_bpb`` (bits per byte = val loss / ln 2), ``initial_val_loss``,
    ``tokens_per_s`` (training throughput), ``elapsed`` (seconds), ``params``, ``stopped`` (why it ended).
    ``overrides`` replace fields of ``config`` (or of the defaults)."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"threads must be >= 1, got {cfg.threads!r}")
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = ByteTokenizer()
    corpus: Corpus = load_corpus(cfg.data, cfg.val_fraction, cfg.patterns)
    model, optimizer, start, state, rng = _build(cfg, run_dir, device, tokenizer)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    if rng is not None:
        _restore_rng(rng, data_gen, device)
    seq_len = model.config["max_seq_len"]
    if seq_len != cfg.seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} differs from the checkpoint's max_seq_len={seq_len}")
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    sched = TwoStageSchedule(cfg.lr, cfg.steps, min(100, cfg.steps // 10) if cfg.warmup_steps is None
                             else cfg.warmup_steps, cfg.stage_split, cfg.stage2_lr_ratio, cfg.min_lr_ratio,
                             cfg.weight_decay)
    end = cfg.stop_at or cfg.steps
    params = sum(p.numel() for p in model.parameters())
    log = _CSVLog(run_dir / "log.csv")
    elapsed0 = float(state.get("elapsed", 0.0))
    tokens_seen = int(state.get("tokens_seen", 0))
    val_loss = state.get("val_loss")
    initial_val = state.get("initial_val_loss")
    t_start = time.time()
    train_time, train_tokens = 0.0, 0
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum

    def elapsed() -> float:
        return elapsed0 + time.time() - t_start

    def checkpoint(step: int) -> None:
        train_state = dict(step=step, tokens_seen=tokens_seen, elapsed=elapsed(), val_loss=val_loss,
                           val_bpb=None if val_loss is None else val_loss / math.log(2),
                           initial_val_loss=initial_val, data=corpus.name)
        save_checkpoint(run_dir, model, optimizer, train_state=train_state, train_config=cfg.to_dict(),
                        tokenizer=tokenizer, rng_states=_rng_states(data_gen, device))

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0,
               desc=f"train {cfg.weights}")

    def say(msg: str) -> None:                      # messages on stderr: stdout stays for results
        bar.write(msg, file=sys.stderr)
    say(f"bitnet train: {corpus!r}, {params / 1e6:.2f}M params, device {device}, "
              f"{'bf16 autocast' if use_amp else 'fp32'}, run folder {run_dir}")
    if start == 0:
        val_loss = initial_val = evaluate(model, corpus.val, cfg, device, autocast)
        log.write(step=0, lr=0.0, val_loss=f"{val_loss:.4f}", val_bpb=f"{val_loss / math.log(2):.4f}", elapsed=0.0)
        say(f"step 0: val loss {val_loss:.4f}, {val_loss / math.log(2):.3f} bpb")
    model.train()
    running, n_running, step, stopped = 0.0, 0, start, "steps"
    train_loss = float("nan")
    try:
        for step in range(start, end):
            t0 = time.time()
            lr = sched.lr(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = sched.wd(step)
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                x, y = get_batch(corpus.train, cfg.batch_size, cfg.seq_len, data_gen, device)
                with autocast():
                    loss = model.loss(x, y)
                (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.time() - t0
            train_tokens += tokens_per_step
            tokens_seen += tokens_per_step
            train_loss = loss_sum / cfg.grad_accum
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss became {train_loss} at step {step + 1}; lower lr")
            running, n_running = running + train_loss, n_running + 1
            tps = train_tokens / max(train_time, 1e-9)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            out_of_time = cfg.max_time is not None and train_time >= cfg.max_time and done < end
            last = done == end or out_of_time                   # evaluate and log the last step of every call
            is_eval = cfg.eval_every and (done % cfg.eval_every == 0 or last)
            row_val = None
            if is_eval:
                val_loss = row_val = evaluate(model, corpus.val, cfg, device, autocast)
                say(f"step {done}: train loss {running / n_running:.4f}, val loss {val_loss:.4f}, "
                          f"{val_loss / math.log(2):.3f} bpb, {tps:,.0f} tok/s, lr {lr:.2e}")
            if is_eval or done % cfg.log_every == 0 or last:
                log.write(step=done, lr=f"{lr:.6g}", train_loss=f"{running / n_running:.4f}",
                          val_loss=None if row_val is None else f"{row_val:.4f}",
                          val_bpb=None if row_val is None else f"{row_val / math.log(2):.4f}",
                          tokens_per_s=f"{tps:.1f}", elapsed=f"{elapsed():.1f}")
                running, n_running = 0.0, 0
            if cfg.save_every and done % cfg.save_every == 0 and done != end:
                checkpoint(done)
            if out_of_time:
                stopped = "max_time"
                step += 1
                break
        else:
            step = end
            stopped = "steps" if end == cfg.steps else "stop_at"
    except KeyboardInterrupt:
        say(f"interrupted: saving a checkpoint at step {step} in {run_dir}")
        checkpoint(step)
        log.close()
        bar.close()
        raise
    bar.close()
    if step > start or start == 0:
        checkpoint(step)
    log.close()
    plot = plot_log(run_dir / "log.csv", run_dir / "loss.png") if cfg.plot else None
    return dict(run_dir=str(run_dir), steps=step, stopped=stopped, final_train_loss=train_loss,
                final_val_loss=val_loss, final_val_bpb=None if val_loss is None else val_loss / math.log(2),
                initial_val_loss=initial_val, tokens_per_s=train_tokens / max(train_time, 1e-9),
                elapsed=elapsed(), params=params, plot=None if plot is None else str(plot))


def config_from_run(run_dir, **overrides: Any) -> TrainConfig:
    """The TrainConfig stored in a run folder's config.json, with ``overrides`` applied (for resuming)."""
    saved = read_config(run_dir).get("train_config") or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    once = ("stop_at", "max_time", "resume")                 # per-invocation settings are not inherited
    kwargs = {k: v for k, v in saved.items() if k in known and k not in once}
    for k in ("betas", "patterns"):
        if isinstance(kwargs.get(k), list):
            kwargs[k] = tuple(kwargs[k])
    kwargs.update(overrides)
    return TrainConfig(**kwargs)
