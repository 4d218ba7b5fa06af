"""The DeepSpeed ZeRO engine, built from config.

On a machine without a GPU DeepSpeed picks its CPU accelerator by itself (it logs "Setting
accelerator to CPU"; ``DS_ACCELERATOR=cpu`` forces it) and collectives go through gloo;
on CUDA the same code uses NCCL and bf16. The optimizer is torch's fused AdamW (CPU and
CUDA), handed to DeepSpeed as a client optimizer, so nothing has to be compiled on first use.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cmal.config import Config
from cmal.errors import RunError


@dataclass
class World:
    """Where this process sits."""

    rank: int
    """Global rank."""
    local_rank: int
    """Rank on this node."""
    size: int
    """Number of processes."""
    device: torch.device
    """Device of this rank."""
    dtype: torch.dtype
    """Compute dtype (bf16 on GPU by default, fp32 on CPU)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(cfg: Config) -> World:
    """Initialise torch.distributed (a world of one when no launcher set RANK/WORLD_SIZE)."""
    import deepspeed
    import torch.distributed as dist

    use_cuda = cfg.engine.device == "cuda" or (
        cfg.engine.device == "auto" and torch.cuda.is_available()
    )
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        # DeepSpeed compiles its shared-memory all-reduce op (C++, ~1 min of 2 cores,
        # redone whenever another environment built it last) at the first start on a CPU
        # machine; it serves only inference_all_reduce, which cmal never calls.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Start-up (rendezvous, the first connections) may wait for late nodes; the
        # training loop sets engine.collective_timeout_s (``watch_peers``).
        start = datetime.timedelta(seconds=max(cfg.engine.collective_timeout_s, START_TIMEOUT_S))
        deepspeed.init_distributed(
            dist_backend="nccl" if use_cuda else "gloo", verbose=False, timeout=start
        )
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    precision = cfg.engine.precision
    bf16 = precision == "bf16" or (precision == "auto" and use_cuda)
    return World(
        dist.get_rank(),
        local,
        dist.get_world_size(),
        device,
        torch.bfloat16 if bf16 else torch.float32,
    )


START_TIMEOUT_S = 1800
"""How long the ranks wait for each other until training starts (torch's gloo default)."""


def watch_peers(cfg: Config) -> None:
    """From here on a collective waits ``engine.collective_timeout_s`` for the other ranks."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        timeout = datetime.timedelta(seconds=cfg.engine.collective_timeout_s)
        # Every group, not only the default one: DeepSpeed reduces gradients on groups of
        # its own, made with the start-up timeout.
        for group in list(dist.distributed_c10d._world.pg_map):
            if group not in _PATIENT:
                dist.set_timeout(timeout, group=group)


_PATIENT: list[Any] = []


def patient_group(timeout: datetime.timedelta):
    """A gloo group of every rank whose collectives wait ``timeout``, which ``watch_peers``
    leaves as it is: for ranks that wait on rank 0's work between training stages."""
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timeout)
    _PATIENT.append(group)
    return group


class PeerLost(RunError):
    """A collective failed: another rank died, hung or was stopped."""


_COLLECTIVE = re.compile(
    r"gloo|nccl|Connection (reset|closed) by peer|Timed out waiting|ProcessGroup|Broken pipe",
    re.IGNORECASE,
)


@contextlib.contextmanager
def peers_watched(cfg: Config, world: World):
    """A failed collective becomes one line naming this rank, what failed and what to do:
    gloo raises a bare RuntimeError when a peer's socket closes (a rank killed) or when
    ``engine.collective_timeout_s`` passes (a rank hung or stopped)."""
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if world.size < 2 or isinstance(e, RunError):
            raise
        if not (isinstance(e, dist.DistError) or _COLLECTIVE.search(str(e))):
            raise
        text = re.sub(r"^\[[^\]]*\] ", "", text)  # gloo's source location
        raise PeerLost(
            f"rank {world.rank}: a collective with the other {world.size - 1} rank(s) failed "
            f"({text}); another rank died, hung or was stopped "
            f"(engine.collective_timeout_s={cfg.engine.collective_timeout_s}). The run "
            "stopped; its newest intact checkpoint is kept: run the job again to resume"
        ) from None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, LayerNorms, scales and embeddings' rows of
    one dimension are left alone (as BERT does)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(cfg: Config):
    """Multiplier of ``optim.lr`` at optimizer step s: linear warm-up, then the decay."""
    o, total = cfg.optim, cfg.engine.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.decay == "constant":
            return 1.0
        t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        shape = 1.0 - t if o.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape

    return f


def ds_config(cfg: Config, world: World) -> dict:
    """The DeepSpeed JSON config implied by our config."""
    e = cfg.engine
    bf16 = world.dtype == torch.bfloat16
    zero: dict = {"stage": e.zero_stage}
    if e.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": e.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16 and e.bf16_mode == "deepspeed"},
        "torch_autocast": {"enabled": bf16 and e.bf16_mode == "autocast", "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        # Our AdamW runs where the offloaded state is; no DeepSpeedCPUAdam to compile.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        # One fixed tag: DeepSpeed's check that every rank saves the same tag is a
        # host read per parameter group for nothing.
        "checkpoint": {"tag_validation": "Ignore"},
        "wall_clock_breakdown": False,
    }


def build_engine(module: nn.Module, cfg: Config, world: World):
    """(engine, scheduler): ``module`` wrapped by DeepSpeed with AdamW and the LR schedule."""
    import deepspeed

    o = cfg.optim
    module.to(world.device)
    if cfg.engine.compile:
        module.compile(dynamic=True)  # in place: parameter names (checkpoints) unchanged
    # Fused on every device: one kernel, and its step counts stay on the device (the
    # foreach path reads each parameter's step to the host).
    optimizer = torch.optim.AdamW(
        param_groups(module, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, world)
    )
    if world.size == 1 and cfg.engine.zero_stage == 0:
        # Alone, there is nothing to average: skip DeepSpeed's flatten-allreduce-unflatten
        # of every gradient after each backward (measured in bench/step.py).
        engine.enable_backward_allreduce = False
    return engine, scheduler
