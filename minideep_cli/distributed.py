"""Training on several processes through torchrun: the process group, DDP or FSDP2 wrapping,
and full (unsharded) state dicts so that a checkpoint is the same file whatever wrote it.

    torchrun --nproc_per_node=N -m minideep_cli train ...      (train.distributed: ddp | fsdp)

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (WORLD_SIZE unset or 1) nothing here
does anything and training runs in one process as before. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .errors import UserError
from .optim import param_names

MODES = ("ddp", "fsdp")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"  # none (one process) | ddp | fsdp
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str, mode: str) -> tuple[Dist, str]:
    """Join the torchrun process group if there is one; returns (Dist, this rank's device)."""
    if mode not in MODES:
        raise UserError(f"train.distributed must be one of {', '.join(MODES)}, got '{mode}'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs on this node")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local, mode, owns), device


def teardown(d: Dist) -> None:
    """Leave the process group once every rank is done with it: a rank that destroyed its group
    while another still used it (gloo, after FSDP's last collectives) was seen to abort."""
    if d.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model, d: Dist, device: str):
    """DDP (gradients all-reduced in buckets during backward) or FSDP2 (parameters, gradients
    and optimizer state sharded; each block all-gathered for its forward and backward)."""
    if not d.active:
        return model
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # router bias buffers are kept equal by an all-reduce of the loads, not by broadcasts
        return DistributedDataParallel(model, device_ids=[d.local_rank] if device.startswith("cuda") else None,
                                       broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (d.world,))
    for block in model.blocks:  # each block its own FSDP unit, gathered just before it runs
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sync_context(wrapped, d: Dist, sync: bool):
    """Gradient sync only on the last micro-step of an optimizer step (DDP no_sync; FSDP2 keeps
    the unsharded gradients until then)."""
    if d.mode == "ddp" and not sync:
        return wrapped.no_sync()
    if d.mode == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def unwrap(wrapped):
    """The model itself (DDP keeps it as .module; FSDP2 shards it in place)."""
    return getattr(wrapped, "module", wrapped)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(wrapped, optimizer, d: Dist) -> tuple[Optional[dict], Optional[dict]]:
    """(model state dict, optimizer state dict), full and on the CPU, on rank 0 (None elsewhere).
    The optimizer state is torch's usual index-keyed form, as one process saves it. Under FSDP
    this is a collective: every rank must call it."""
    model = unwrap(wrapped)
    if d.mode != "fsdp":
        if not d.main:
            return None, None
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model, options=_options())
    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    if not d.main:
        return None, None
    index = {n: i for i, n in enumerate(param_names(optimizer))}
    osd = {"state": {index[n]: s for n, s in osd["state"].items()},
           "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}
    return msd, osd


def load_optimizer(wrapped, optimizer, state: dict, d: Dist) -> None:
    """Load an index-keyed full optimizer state (from any checkpoint) into this run's optimizer."""
    if d.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    model = unwrap(wrapped)
    names = param_names(optimizer)
    named = {"state": {names[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """In place, on every rank (a no-op in one process); op: sum | max."""
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def gather_objects(obj, d: Dist) -> list:
    """Every rank's obj, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()
