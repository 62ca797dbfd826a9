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

The module's parts: :mod:`.config` (TrainConfig, the optimizer), :mod:`.distributed` (process group,
DDP / FSDP), :mod:`.resume` (train state, log cut, Ctrl-C, RNG states), :mod:`.log` (log.csv, loss.png);
:class:`_Run` here runs one call in named steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import (CONFIG_FILE, OPTIMIZER_FILE, PENDING_FILE, CheckpointError, inside, load_checkpoint,
                  load_optimizer, read_config, recover_checkpoint, remove_stale_temps, resolve_device,
                  save_checkpoint, verify_checkpoint)
from ..models import BitNetTransformer
from ..tokenizer import ByteTokenizer
from .config import TrainConfig, config_from_run, make_optimizer  # noqa: F401  (importable here as before)
from .data import Corpus, get_batch, load_corpus
from .distributed import Dist, LossFn, fsdp_full_copy, fsdp_wrap, init_distributed
from .log import CSVLog, plot_log, save_plot  # noqa: F401  (save_plot: importable here as before)
from .resume import StopRequest, check_train_state, restore_rng, rng_states, truncate_log
from .schedule import TwoStageSchedule


@torch.no_grad()
def evaluate(model: nn.Module, data, cfg: TrainConfig, device, autocast, *, dist_ctx: "Dist | None" = None,
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


def make_schedule(cfg: TrainConfig) -> TwoStageSchedule:
    """The run's LR / weight-decay schedule (warmup default: min(100, steps // 10))."""
    warmup = min(100, cfg.steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps
    return TwoStageSchedule(cfg.lr, cfg.steps, warmup, cfg.stage_split, cfg.stage2_lr_ratio, cfg.min_lr_ratio,
                            cfg.weight_decay)


def train(config: TrainConfig | None = None, **overrides: Any) -> dict:
    """Train a BitNetTransformer on bytes. Returns a dict: ``run_dir``, ``steps``, ``final_train_loss``,
    ``final_val_loss``, ``final_val_bpb`` (bits per byte = val loss / ln 2), ``initial_val_loss``,
    ``tokens_per_s`` (training throughput), ``elapsed`` (seconds), ``params``, ``stopped`` (why it ended).
    ``overrides`` replace fields of ``config`` (or of the defaults)."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    cfg.validate()
    device = resolve_device(cfg.device)
    dist_ctx, device = init_distributed(cfg, device)
    try:
        return _Run(cfg, device, dist_ctx).run()
    finally:
        if dist_ctx is not None and dist_ctx.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Run:
    """One call of :func:`train`, in named steps: :meth:`setup` (folder, data, model and optimizer, fresh
    or resumed), :meth:`restore_rng`, :meth:`wrap_distributed` (DDP / FSDP), :meth:`prepare_loop`
    (schedule, autocast, log, counters), then :meth:`loop` (one :meth:`step` after another, :meth:`evaluate`
    and :meth:`checkpoint` when due, Ctrl-C handled by :meth:`run`) and :meth:`result`."""

    def __init__(self, cfg: TrainConfig, device: torch.device, dist_ctx: Dist | None):
        self.cfg, self.device, self.dist_ctx = cfg, device, dist_ctx
        self.rank, self.world = (0, 1) if dist_ctx is None else (dist_ctx.rank, dist_ctx.world)
        self.main = self.rank == 0

    # ----------------------------------------------------------------------------------------- steps

    def run(self) -> dict:
        cfg = self.cfg
        rng = self.setup()
        self.restore_rng(rng)
        self.wrap_distributed()
        self.prepare_loop()
        from tqdm.auto import tqdm

        self.bar = tqdm(total=cfg.steps, initial=self.start, disable=not (cfg.progress and self.main),
                        dynamic_ncols=True, mininterval=1.0, desc=f"train {cfg.weights}")
        self.announce()
        self.model.train()
        if self.wrapped is not None:
            self.wrapped.train()
        try:
            step, stopped = self.loop()
        except KeyboardInterrupt:                            # a second Ctrl-C: no step boundary to save at
            self.say(f"stopped at once: nothing saved by this call (the last checkpoint in {self.run_dir} stays)")
            if self.log is not None:
                self.log.close()
            self.bar.close()
            raise
        self.bar.close()
        if step > self.start or self.start == 0:
            self.checkpoint(step)
        if stopped == "interrupted":
            self.say(f"interrupted: saved a checkpoint at step {step} in {self.run_dir}; continue it with --resume")
            if self.log is not None:
                self.log.close()
            raise KeyboardInterrupt
        return self.result(step, stopped)

    def setup(self) -> dict | None:
        """Threads, run folder, data, model and optimizer (fresh or from the checkpoint); the folder is made
        (and cleaned of killed saves) only once everything is checked. Returns the saved RNG tensors."""
        cfg, dist_ctx = self.cfg, self.dist_ctx
        if cfg.threads is not None:
            if cfg.threads < 1:
                raise ValueError(f"threads must be >= 1, got {cfg.threads!r}")
            torch.set_num_threads(cfg.threads)
        run_dir = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if dist_ctx is not None:
            run_dir = Path(dist_ctx.broadcast(str(run_dir)))     # one folder for all ranks (default: a timestamp)
        if run_dir.exists() and not run_dir.is_dir():
            raise FileExistsError(f"out={str(run_dir)!r} is a file, not a run folder")
        self.run_dir = run_dir
        torch.manual_seed(cfg.seed)
        self.tokenizer = ByteTokenizer()
        self.corpus: Corpus = load_corpus(cfg.data, cfg.val_fraction, cfg.patterns)
        _check_data_fits(self.corpus, cfg)
        if self.main and cfg.resume and run_dir.is_dir():
            recover_checkpoint(run_dir)                          # an interrupted save, completed before reading
        if dist_ctx is not None:
            dist_ctx.barrier()
        self.model, self.optimizer, self.start, self.state, rng = _build(cfg, run_dir, self.device, self.tokenizer)
        self.removed = []
        if self.main:                                            # everything checked: now the folder may be made
            run_dir.mkdir(parents=True, exist_ok=True)
            self.removed = remove_stale_temps(run_dir)
            truncate_log(run_dir / "log.csv", self.start if self.start > 0 else -1)
        self.params = sum(p.numel() for p in self.model.parameters())
        return rng

    def restore_rng(self, rng: dict | None) -> None:
        """This rank's data generator (its own windows), put back to the checkpoint's state on a resume."""
        rank = self.rank
        self.data_gen = torch.Generator().manual_seed(self.cfg.seed + 1_000_003 * rank)
        if rng is not None:
            if rank:
                rng = {k: rng[f"{k}.rank{rank}"] for k in ("data", "torch", "cuda") if f"{k}.rank{rank}" in rng}
                if "data" not in rng:
                    raise ValueError(f"{self.run_dir}: the checkpoint has no RNG state for rank {rank}; resume it "
                                     "with the number of processes that saved it")
            restore_rng(rng, self.data_gen, self.device)
        if self.dist_ctx is not None:
            self.dist_ctx.barrier()                              # every rank has read the checkpoint (if any)

    def wrap_distributed(self) -> None:
        """``engine(x, y) -> loss``, what the loop calls: the model's loss, or its DDP / FSDP wrapper."""
        cfg, dist_ctx = self.cfg, self.dist_ctx
        self.engine, self.wrapped = self.model.loss, None
        if dist_ctx is not None and cfg.fsdp:
            self.wrapped, self.optimizer = fsdp_wrap(self.model, self.optimizer, cfg)
            self.engine = self.wrapped
        elif dist_ctx is not None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device = self.device
            self.wrapped = DDP(LossFn(self.model), device_ids=[device.index] if device.type == "cuda" else None)
            self.engine = self.wrapped
        self.fsdp_forward = self.engine if dist_ctx is not None and cfg.fsdp else None

    def prepare_loop(self) -> None:
        """Schedule, autocast, the log, and the counters a resume carries on from the train state."""
        cfg, state = self.cfg, self.state
        seq_len = self.model.config["max_seq_len"]
        if seq_len != cfg.seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} differs from the checkpoint's max_seq_len={seq_len}")
        self.use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        device_type = self.device.type
        self.autocast = ((lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if self.use_amp
                         else contextlib.nullcontext)
        self.sched = make_schedule(cfg)
        self.end = cfg.stop_at or cfg.steps
        self.log = CSVLog(self.run_dir / "log.csv") if self.main else None
        self.elapsed0 = float(state.get("elapsed", 0.0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.val_loss = state.get("val_loss")
        self.initial_val = state.get("initial_val_loss")
        self.t_start = time.time()
        self.train_time, self.train_tokens = 0.0, 0
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world
        self.train_loss = float("nan")

    def announce(self) -> None:
        """The run's first messages, and on a fresh run the step-0 validation loss (logged)."""
        cfg, dist_ctx, world = self.cfg, self.dist_ctx, self.world
        mode = "" if dist_ctx is None else f", {world} processes ({'FSDP' if cfg.fsdp else 'DDP'})"
        self.say(f"bitnet train: {self.corpus!r}, {self.params / 1e6:.2f}M params, device {self.device}{mode}, "
                 f"{'bf16 autocast' if self.use_amp else 'fp32'}, run folder {self.run_dir}")
        if self.main and self.removed:
            self.say(f"removed {len(self.removed)} temporary file(s) of interrupted saves from {self.run_dir}")
        if self.start == 0:
            self.val_loss = self.initial_val = self.evaluate()
            if self.main:
                self.log.write(step=0, lr=0.0, val_loss=f"{self.val_loss:.4f}",
                               val_bpb=f"{self.val_loss / math.log(2):.4f}", elapsed=0.0)
            self.say(f"step 0: val loss {self.val_loss:.4f}, {self.val_loss / math.log(2):.3f} bpb")

    def loop(self) -> tuple[int, str]:
        """Steps ``start .. end``: (the step reached, why it stopped: "steps", "stop_at", "max_time" or
        "interrupted" (a first Ctrl-C, at a step boundary: the checkpoint is exact))."""
        cfg, dist_ctx, end = self.cfg, self.dist_ctx, self.end
        running, n_running, step = 0.0, 0, self.start
        stop = StopRequest(self.say)                            # Ctrl-C: stop at the next step boundary
        with stop:
            for step in range(self.start, end):
                if stop.requested if dist_ctx is None else dist_ctx.any(stop.requested):
                    return step, "interrupted"
                lr, train_loss = self.step(step)
                running, n_running = running + train_loss, n_running + 1
                tps = self.train_tokens / max(self.train_time, 1e-9)
                done = step + 1
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                out_of_time = cfg.max_time is not None and self.train_time >= cfg.max_time and done < end
                if dist_ctx is not None and cfg.max_time is not None:
                    out_of_time = dist_ctx.any(out_of_time)                  # all ranks stop together
                last = done == end or out_of_time                   # evaluate and log the last step of every call
                is_eval = cfg.eval_every and (done % cfg.eval_every == 0 or last)
                row_val = None
                if is_eval:
                    self.val_loss = row_val = self.evaluate()
                    self.say(f"step {done}: train loss {running / n_running:.4f}, val loss {self.val_loss:.4f}, "
                             f"{self.val_loss / math.log(2):.3f} bpb, {tps:,.0f} tok/s, lr {lr:.2e}")
                if self.main and (is_eval or done % cfg.log_every == 0 or last):
                    self.log.write(step=done, lr=f"{lr:.6g}", train_loss=f"{running / n_running:.4f}",
                                   val_loss=None if row_val is None else f"{row_val:.4f}",
                                   val_bpb=None if row_val is None else f"{row_val / math.log(2):.4f}",
                                   tokens_per_s=f"{tps:.1f}", elapsed=f"{self.elapsed():.1f}")
                    running, n_running = 0.0, 0
                if cfg.save_every and done % cfg.save_every == 0 and done != end:
                    self.checkpoint(done)
                if out_of_time:
                    return step + 1, "max_time"
        return end, "steps" if end == cfg.steps else "stop_at"

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step (``grad_accum`` micro-batches, gradients all-reduced once): (lr, train loss)."""
        cfg, dist_ctx, optimizer, wrapped = self.cfg, self.dist_ctx, self.optimizer, self.wrapped
        t0 = time.time()
        lr = self.sched.lr(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.param_groups[0]["weight_decay"] = self.sched.wd(step)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y = get_batch(self.corpus.train, cfg.batch_size, cfg.seq_len, self.data_gen, self.device)
            sync = micro == cfg.grad_accum - 1                  # all-reduce gradients once per step
            no_sync = contextlib.nullcontext()
            if wrapped is not None and cfg.fsdp:
                wrapped.set_requires_gradient_sync(sync)
            elif wrapped is not None and not sync:
                no_sync = wrapped.no_sync()
            with no_sync:
                with self.autocast():
                    loss = self.engine(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        if dist_ctx is not None:
            loss_sum = dist_ctx.sum(loss_sum) / self.world                 # the mean over the ranks
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_((wrapped or self.model).parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_time += time.time() - t0
        self.train_tokens += self.tokens_per_step
        self.tokens_seen += self.tokens_per_step
        self.train_loss = train_loss = loss_sum / cfg.grad_accum
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} at step {step + 1}; lower lr")
        return lr, train_loss

    def evaluate(self) -> float:
        """The validation loss now (:func:`evaluate`)."""
        return evaluate(self.model, self.corpus.val, self.cfg, self.device, self.autocast, dist_ctx=self.dist_ctx,
                        forward=self.fsdp_forward)

    def checkpoint(self, step: int) -> None:
        """Rank 0 writes; distributed, every rank must call it (RNG states gathered, FSDP unsharded)."""
        cfg, dist_ctx, val_loss = self.cfg, self.dist_ctx, self.val_loss
        train_state = dict(step=step, tokens_seen=self.tokens_seen, elapsed=self.elapsed(), val_loss=val_loss,
                           val_bpb=None if val_loss is None else val_loss / math.log(2),
                           initial_val_loss=self.initial_val, data=self.corpus.name, world_size=self.world)
        states = rng_states(self.data_gen, self.device)
        save_model, save_opt = self.model, self.optimizer
        if dist_ctx is not None:
            for r, gathered in enumerate(dist_ctx.gather({k: v.cpu() for k, v in states.items()})):
                if r:
                    states.update({f"{k}.rank{r}": v for k, v in gathered.items()})
            if cfg.fsdp:
                save_model, save_opt = fsdp_full_copy(self.wrapped, self.optimizer, cfg, self.rank)
        if self.main:
            save_checkpoint(self.run_dir, save_model, save_opt, train_state=train_state, train_config=cfg.to_dict(),
                            tokenizer=self.tokenizer, rng_states=states)
        if dist_ctx is not None:
            dist_ctx.barrier()

    def result(self, step: int, stopped: str) -> dict:
        """Close the log, draw loss.png, and the dict :func:`train` returns."""
        cfg, val_loss = self.cfg, self.val_loss
        plot = None
        if self.main:
            self.log.close()
            plot = plot_log(self.run_dir / "log.csv", self.run_dir / "loss.png") if cfg.plot else None
        result = dict(run_dir=str(self.run_dir), steps=step, stopped=stopped, final_train_loss=self.train_loss,
                      final_val_loss=val_loss, final_val_bpb=None if val_loss is None else val_loss / math.log(2),
                      initial_val_loss=self.initial_val, tokens_per_s=self.train_tokens / max(self.train_time, 1e-9),
                      elapsed=self.elapsed(), params=self.params, plot=None if plot is None else str(plot))
        if self.dist_ctx is not None:
            result.update(rank=self.rank, world_size=self.world, parallel="fsdp" if cfg.fsdp else "ddp")
        return result

    # ----------------------------------------------------------------------------------------- helpers

    def elapsed(self) -> float:
        return self.elapsed0 + time.time() - self.t_start

    def say(self, msg: str) -> None:                    # messages on stderr: stdout stays for results
        if self.main:
            self.bar.write(msg, file=sys.stderr)
