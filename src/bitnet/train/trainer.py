"""The training loop: ``train(TrainConfig(...)) -> result dict``.

One run folder holds everything (see :mod:`bitnet.io` for the checkpoint files)::

    out/config.json, model.safetensors, optimizer.safetensors   checkpoint (atomic saves)
    out/log.csv     step, lr, train_loss, val_loss, val_bpb, tokens_per_s, elapsed
    out/loss.png    loss curves (when matplotlib is installed)

``resume=True`` continues a run from its folder: model, optimizer, step, RNG states (torch and the
data sampler) are restored and the schedule goes on where it stopped, so a run split by
``stop_at``, Ctrl-C or a kill + resume ends with the same weights and the same loss curve as an
uninterrupted one (on the same device). Ctrl-C (SIGINT) lets the step in progress finish, saves a
checkpoint at that step boundary and raises KeyboardInterrupt; a second Ctrl-C stops at once, without
a checkpoint. A resume first completes an interrupted save (see :mod:`bitnet.io`), deletes the temporary
files of killed saves and drops the log.csv rows written after the checkpoint, so every step has one row.

Several processes (``torchrun --nproc_per_node=N -m bitnet train ...``; RANK / WORLD_SIZE set): the
process group is initialised (gloo on CPU, nccl on CUDA, one GPU per LOCAL_RANK) and the model is wrapped
in DistributedDataParallel, or sharded with FSDP2 ``fully_shard`` when ``fsdp=True``. Every rank draws
its own random windows (data generator seeded by ``seed`` and the rank), so a step sees
``world_size * batch_size * grad_accum`` sequences; validation batches are split over the ranks and the
loss all-reduced. Only rank 0 logs, writes log.csv / loss.png and the checkpoint (a full, unsharded one,
the same format as a single-process run); every rank's RNG state is saved so resume stays exact.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import (CONFIG_FILE, OPTIMIZER_FILE, PENDING_FILE, CheckpointError, inside,
                  load_checkpoint, load_optimizer, read_config, recover_checkpoint, remove_stale_temps, resolve_device,
                  save_checkpoint, verify_checkpoint)
from ..models import BitNetTransformer
from ..nn.feedforward import ACTIVATIONS
from ..nn.layers import WEIGHTS_CHOICES
from ..tokenizer import ByteTokenizer
from .data import DEFAULT_PATTERNS, Corpus, get_batch, load_corpus
from .resume import LOG_FIELDS, StopRequest, check_train_state, truncate_log
from .schedule import TwoStageSchedule



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


@torch.no_grad()
def evaluate(model: nn.Module, data, cfg: TrainConfig, device, autocast, *, dist_ctx: "_Dist | None" = None,
             forward=None) -> float:
    """Mean validation loss (nats/token) on ``eval_batches`` fixed windows (same windows every call).

    Distributed (``dist_ctx``): batch ``i`` is evaluated by rank ``i % world_size`` and the sum all-reduced;
    with FSDP (every rank must run every forward) all ranks evaluate all batches through ``forward``."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    world = 1 if dist_ctx is None else dist_ctx.world
    split = world > 1 and not dist_ctx.fsdp
    total = 0.0
    for i in range(cfg.eval_batches):
        x, y = get_batch(data, cfg.batch_size, cfg.seq_len, gen, device)   # always drawn: same windows
        if split and i % world != dist_ctx.rank:
            continue
        with autocast():
            total += float(model.loss(x, y) if forward is None else forward(x, y))
    model.train(was_training)
    if split:
        total = dist_ctx.sum(total)
    return total / cfg.eval_batches


class _LossFn(nn.Module):
    """``forward(x, y) = model.loss(x, y)``: the module DDP / FSDP wrap (their hooks run on forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


@dataclass
class _Dist:
    """The process group of a torchrun launch (or one initialised by the caller)."""

    rank: int
    world: int
    fsdp: bool
    owned: bool                          # initialised here: destroyed at the end of train()

    def sum(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, obj):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _init_distributed(cfg: TrainConfig, device: torch.device) -> tuple["_Dist | None", torch.device]:
    """Join the torchrun process group when RANK / WORLD_SIZE are set (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not (dist.is_available() and (launched or dist.is_initialized())):
        if cfg.fsdp:
            raise ValueError("fsdp=True needs several processes: launch with "
                             "torchrun --nproc_per_node=N -m bitnet train --fsdp ...")
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"distributed training supports cpu (gloo) and cuda (nccl), not {device.type}")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), bool(cfg.fsdp), owned), device


def _fsdp_wrap(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> tuple:
    """Shard ``model`` (each transformer layer, then the rest) with FSDP2; move ``optimizer``'s state over."""
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:                                    # pragma: no cover - old torch
        raise RuntimeError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from e
    wrapper = _LossFn(model)
    full_osd = _optim_state_by_name(wrapper, optimizer) if optimizer.state else None
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(wrapper)
    sharded_opt = make_optimizer(model, cfg)
    if full_osd is not None:
        set_optimizer_state_dict(wrapper, sharded_opt, full_osd,
                                 options=StateDictOptions(full_state_dict=True))
    return wrapper, sharded_opt


def _optim_state_by_name(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A plain optimizer's state dict keyed by ``module``'s parameter names (the "full" DCP format)."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {order[i]: v for i, v in sd["state"].items()}, "param_groups": groups}


def _fsdp_full_copy(wrapper: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, rank: int):
    """Gather the sharded model and optimizer (a collective); rank 0 gets plain CPU copies, others None."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(wrapper, options=opts)
    osd = get_optimizer_state_dict(wrapper, optimizer, options=opts)
    if rank != 0:
        return None, None
    copy = _LossFn(BitNetTransformer(**wrapper.model.config))
    copy.load_state_dict(msd)
    opt = make_optimizer(copy.model, cfg)
    names = {id(p): n for n, p in copy.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    opt.load_state_dict({"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups})
    return copy.model, opt


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
    return save_plot(fig, ax, out_path, "loss (nats / byte)", log_path.parent.name)


def save_plot(fig, ax, out_path: Path, ylabel: str, title: str) -> Path:
    """Label a loss-per-step plot (grid, legend), write it to ``out_path`` and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
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
    has_ckpt = (run_dir / CONFIG_FILE).is_file() or (run_dir / PENDING_FILE).is_file()
    if cfg.resume and not has_ckpt:
        raise FileNotFoundError(f"resume=True but {run_dir} has no checkpoint ({CONFIG_FILE})")
    if not cfg.resume and has_ckpt:
        raise FileExistsError(f"{run_dir} already holds a checkpoint; pass resume=True to continue it "
                              "or choose another out folder")
    if not cfg.resume:
        model = BitNetTransformer(**cfg.model_kwargs(tokenizer.vocab_size)).to(device)
        return model, make_optimizer(model, cfg), 0, {}, None
    saved = read_config(run_dir)
    cfg_file = run_dir / CONFIG_FILE
    if (saved.get("model_config") or {}).get("packed"):
        raise CheckpointError(f"{cfg_file}: model_config.packed is true: a packed model cannot be trained further")
    verify_checkpoint(run_dir, saved, roles=("model", "optimizer") if saved.get("checkpoint") else ("model",))
    state = check_train_state(saved.get("train_state"), cfg_file)
    model = load_checkpoint(run_dir, device=device, run_config=saved)[0]      # config.json read once
    optimizer = make_optimizer(model, cfg)
    opt_name = (saved.get("files") or {}).get("optimizer", OPTIMIZER_FILE)
    opt_file = inside(run_dir, opt_name, cfg_file, "files.optimizer")
    if not opt_file.is_file():
        raise FileNotFoundError(f"resume=True but {run_dir} has no optimizer state ({opt_name}): it was not "
                                "saved by bitnet train")
    rng = load_optimizer(optimizer, opt_file)
    if "data" not in rng or "torch" not in rng:
        raise CheckpointError(f"{opt_file} holds no RNG states (rng.data, rng.torch): it was not saved by bitnet train")
    return model, optimizer, state["step"], state, rng


def _check_data_fits(corpus: Corpus, cfg: TrainConfig) -> None:
    for split, data in (("training", corpus.train), ("validation", corpus.val)):
        if len(data) < cfg.seq_len + 1:
            raise ValueError(f"data {corpus.name!r}: its {split} split has {len(data)} bytes, fewer than "
                             f"seq_len + 1 = {cfg.seq_len + 1}; use more data, a shorter --seq-len or another "
                             "--val-fraction")


def train(config: TrainConfig | None = None, **overrides: Any) -> dict:
    """Train a BitNetTransformer on bytes. Returns a dict: ``run_dir``, ``steps``, ``final_train_loss``,
    ``final_val_loss``, ``final_val_bpb`` (bits per byte = val loss / ln 2), ``initial_val_loss``,
    ``tokens_per_s`` (training throughput), ``elapsed`` (seconds), ``params``, ``stopped`` (why it ended).
    ``overrides`` replace fields of ``config`` (or of the defaults)."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    cfg.validate()
    device = resolve_device(cfg.device)
    dist_ctx, device = _init_distributed(cfg, device)
    try:
        return _train(cfg, device, dist_ctx)
    finally:
        if dist_ctx is not None and dist_ctx.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device, dist_ctx: _Dist | None) -> dict:
    rank, world = (0, 1) if dist_ctx is None else (dist_ctx.rank, dist_ctx.world)
    main = rank == 0
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"threads must be >= 1, got {cfg.threads!r}")
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if dist_ctx is not None:
        run_dir = Path(dist_ctx.broadcast(str(run_dir)))     # one folder for all ranks (default: a timestamp)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"out={str(run_dir)!r} is a file, not a run folder")
    torch.manual_seed(cfg.seed)
    tokenizer = ByteTokenizer()
    corpus: Corpus = load_corpus(cfg.data, cfg.val_fraction, cfg.patterns)
    _check_data_fits(corpus, cfg)
    if main and cfg.resume and run_dir.is_dir():
        recover_checkpoint(run_dir)                          # an interrupted save, completed before reading
    if dist_ctx is not None:
        dist_ctx.barrier()
    model, optimizer, start, state, rng = _build(cfg, run_dir, device, tokenizer)
    if main:                                                 # everything checked: now the folder may be made
        run_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temps(run_dir)
        truncate_log(run_dir / "log.csv", start if start > 0 else -1)
    params = sum(p.numel() for p in model.parameters())
    data_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)     # each rank its own windows
    if rng is not None:
        if rank:
            rng = {k: rng[f"{k}.rank{rank}"] for k in ("data", "torch", "cuda") if f"{k}.rank{rank}" in rng}
            if "data" not in rng:
                raise ValueError(f"{run_dir}: the checkpoint has no RNG state for rank {rank}; resume it with "
                                 "the number of processes that saved it")
        _restore_rng(rng, data_gen, device)
    if dist_ctx is not None:
        dist_ctx.barrier()                                   # every rank has read the checkpoint (if any)
    engine = model.loss                                      # what the loop calls: engine(x, y) -> loss
    wrapped = None
    if dist_ctx is not None and cfg.fsdp:
        wrapped, optimizer = _fsdp_wrap(model, optimizer, cfg)
        engine = wrapped
    elif dist_ctx is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(_LossFn(model), device_ids=[device.index] if device.type == "cuda" else None)
        engine = wrapped
    seq_len = model.config["max_seq_len"]
    if seq_len != cfg.seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} differs from the checkpoint's max_seq_len={seq_len}")
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    sched = TwoStageSchedule(cfg.lr, cfg.steps, min(100, cfg.steps // 10) if cfg.warmup_steps is None
                             else cfg.warmup_steps, cfg.stage_split, cfg.stage2_lr_ratio, cfg.min_lr_ratio,
                             cfg.weight_decay)
    end = cfg.stop_at or cfg.steps
    log = _CSVLog(run_dir / "log.csv") if main else None
    elapsed0 = float(state.get("elapsed", 0.0))
    tokens_seen = int(state.get("tokens_seen", 0))
    val_loss = state.get("val_loss")
    initial_val = state.get("initial_val_loss")
    t_start = time.time()
    train_time, train_tokens = 0.0, 0
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    fsdp_forward = engine if dist_ctx is not None and cfg.fsdp else None

    def val() -> float:
        return evaluate(model, corpus.val, cfg, device, autocast, dist_ctx=dist_ctx, forward=fsdp_forward)

    def elapsed() -> float:
        return elapsed0 + time.time() - t_start

    def checkpoint(step: int) -> None:
        """Rank 0 writes; distributed, every rank must call it (RNG states gathered, FSDP unsharded)."""
        train_state = dict(step=step, tokens_seen=tokens_seen, elapsed=elapsed(), val_loss=val_loss,
                           val_bpb=None if val_loss is None else val_loss / math.log(2),
                           initial_val_loss=initial_val, data=corpus.name, world_size=world)
        rng_states = _rng_states(data_gen, device)
        save_model, save_opt = model, optimizer
        if dist_ctx is not None:
            for r, states in enumerate(dist_ctx.gather({k: v.cpu() for k, v in rng_states.items()})):
                if r:
                    rng_states.update({f"{k}.rank{r}": v for k, v in states.items()})
            if cfg.fsdp:
                save_model, save_opt = _fsdp_full_copy(wrapped, optimizer, cfg, rank)
        if main:
            save_checkpoint(run_dir, save_model, save_opt, train_state=train_state, train_config=cfg.to_dict(),
                            tokenizer=tokenizer, rng_states=rng_states)
        if dist_ctx is not None:
            dist_ctx.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and main), dynamic_ncols=True, mininterval=1.0,
               desc=f"train {cfg.weights}")

    def say(msg: str) -> None:                      # messages on stderr: stdout stays for results
        if main:
            bar.write(msg, file=sys.stderr)
    mode = "" if dist_ctx is None else f", {world} processes ({'FSDP' if cfg.fsdp else 'DDP'})"
    say(f"bitnet train: {corpus!r}, {params / 1e6:.2f}M params, device {device}{mode}, "
              f"{'bf16 autocast' if use_amp else 'fp32'}, run folder {run_dir}")
    if main and removed:
        say(f"removed {len(removed)} temporary file(s) of interrupted saves from {run_dir}")
    if start == 0:
        val_loss = initial_val = val()
        if main:
            log.write(step=0, lr=0.0, val_loss=f"{val_loss:.4f}", val_bpb=f"{val_loss / math.log(2):.4f}", elapsed=0.0)
        say(f"step 0: val loss {val_loss:.4f}, {val_loss / math.log(2):.3f} bpb")
    model.train()
    if wrapped is not None:
        wrapped.train()
    running, n_running, step, stopped = 0.0, 0, start, "steps"
    train_loss = float("nan")
    stop = StopRequest(say)                                 # Ctrl-C: stop at the next step boundary
    try:
        with stop:
            for step in range(start, end):
                if stop.requested if dist_ctx is None else dist_ctx.any(stop.requested):
                    stopped = "interrupted"                 # at a step boundary: the checkpoint is exact
                    break
                t0 = time.time()
                lr = sched.lr(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.param_groups[0]["weight_decay"] = sched.wd(step)
                loss_sum = 0.0
                for micro in range(cfg.grad_accum):
                    x, y = get_batch(corpus.train, cfg.batch_size, cfg.seq_len, data_gen, device)
                    sync = micro == cfg.grad_accum - 1                  # all-reduce gradients once per step
                    no_sync = contextlib.nullcontext()
                    if wrapped is not None and cfg.fsdp:
                        wrapped.set_requires_gradient_sync(sync)
                    elif wrapped is not None and not sync:
                        no_sync = wrapped.no_sync()
                    with no_sync:
                        with autocast():
                            loss = engine(x, y)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach())
                if dist_ctx is not None:
                    loss_sum = dist_ctx.sum(loss_sum) / world                 # the mean over the ranks
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_((wrapped or model).parameters(), cfg.grad_clip)
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
                if dist_ctx is not None and cfg.max_time is not None:
                    out_of_time = dist_ctx.any(out_of_time)                  # all ranks stop together
                last = done == end or out_of_time                   # evaluate and log the last step of every call
                is_eval = cfg.eval_every and (done % cfg.eval_every == 0 or last)
                row_val = None
                if is_eval:
                    val_loss = row_val = val()
                    say(f"step {done}: train loss {running / n_running:.4f}, val loss {val_loss:.4f}, "
                              f"{val_loss / math.log(2):.3f} bpb, {tps:,.0f} tok/s, lr {lr:.2e}")
                if main and (is_eval or done % cfg.log_every == 0 or last):
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
    except KeyboardInterrupt:                                # a second Ctrl-C: no step boundary to save at
        say(f"stopped at once: nothing saved by this call (the last checkpoint in {run_dir} stays)")
        if log is not None:
            log.close()
        bar.close()
        raise
    bar.close()
    if step > start or start == 0:
        checkpoint(step)
    if stopped == "interrupted":
        say(f"interrupted: saved a checkpoint at step {step} in {run_dir}; continue it with --resume")
        if log is not None:
            log.close()
        raise KeyboardInterrupt
    plot = None
    if main:
        log.close()
        plot = plot_log(run_dir / "log.csv", run_dir / "loss.png") if cfg.plot else None
    result = dict(run_dir=str(run_dir), steps=step, stopped=stopped, final_train_loss=train_loss,
                  final_val_loss=val_loss, final_val_bpb=None if val_loss is None else val_loss / math.log(2),
                  initial_val_loss=initial_val, tokens_per_s=train_tokens / max(train_time, 1e-9),
                  elapsed=elapsed(), params=params, plot=None if plot is None else str(plot))
    if dist_ctx is not None:
        result.update(rank=rank, world_size=world, parallel="fsdp" if cfg.fsdp else "ddp")
    return result


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
