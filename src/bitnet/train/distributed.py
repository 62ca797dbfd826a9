"""Several processes (torchrun): the process group joined, the model wrapped in DistributedDataParallel or
sharded with FSDP2, and a sharded model gathered back into a plain one for the checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..models import BitNetTransformer
from .config import TrainConfig, make_optimizer


class LossFn(nn.Module):
    """``forward(x, y) = model.loss(x, y)``: the module DDP / FSDP wrap (their hooks run on forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


@dataclass
class Dist:
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


def init_distributed(cfg: TrainConfig, device: torch.device) -> tuple["Dist | None", torch.device]:
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
    return Dist(dist.get_rank(), dist.get_world_size(), bool(cfg.fsdp), owned), device


def fsdp_wrap(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> tuple:
    """Shard ``model`` (each transformer layer, then the rest) with FSDP2; move ``optimizer``'s state over."""
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:                                    # pragma: no cover - old torch
        raise RuntimeError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from e
    wrapper = LossFn(model)
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


def fsdp_full_copy(wrapper: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, rank: int):
    """Gather the sharded model and optimizer (a collective); rank 0 gets plain CPU copies, others None."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(wrapper, options=opts)
    osd = get_optimizer_state_dict(wrapper, optimizer, options=opts)
    if rank != 0:
        return None, None
    copy = LossFn(BitNetTransformer(**wrapper.model.config))
    copy.load_state_dict(msd)
    opt = make_optimizer(copy.model, cfg)
    names = {id(p): n for n, p in copy.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    opt.load_state_dict({"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups})
    return copy.model, opt
