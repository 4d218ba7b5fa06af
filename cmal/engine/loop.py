"""The training loop: step, accumulate, log, evaluate, save — and save-on-signal at a step
boundary with the flag all-reduced, so every rank saves together.

The loop never knows which task it trains: it is given a module whose forward takes a
collated item (``cmal.data.stream.Collate``) and returns a dict of losses with the total
under ``"loss"``, and a loader of such items.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cmal.config import Config
from cmal.data.errors import DataError
from cmal.engine.checkpoint import Checkpointer, rng_state, set_rng_state
from cmal.engine.deepspeed import World

if TYPE_CHECKING:
    from cmal.observe import Observer

PREEMPTED_EXIT = 75
"""Exit status of a run that saved on signal and wants to be started again (EX_TEMPFAIL)."""
MAX_SKIPS = 100
"""Consecutive non-finite micro-batches skipped before the run gives up."""


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss; names the step and the loss terms."""


class StopFlag:
    """Set by the configured signal; read at step boundaries."""

    def __init__(self, name: str):
        self.signum = getattr(signal, name)
        self.raised = False
        self._old = signal.signal(self.signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        signal.signal(self.signum, self._old)


@dataclass
class Outcome:
    """How the loop ended."""

    status: str
    """"done" or "preempted"."""
    step: int
    """Optimizer steps completed."""
    losses: dict[str, float] = field(default_factory=dict)
    """Last logged losses."""


def epochs(loader) -> Iterator[dict[str, Any]]:
    """Batches forever, epoch after epoch; an epoch with no batch is an error, except right
    after a resume at the very end of an epoch."""
    first = True
    while True:
        seen = 0
        for item in loader:
            seen += 1
            if item.get("ids"):  # none: every sample of the batch was skipped as bad
                yield item
        if seen == 0 and not first:
            raise DataError("an epoch of the training data yielded no batch (empty or all skipped)")
        first = False


class Progress:
    """One line on rank 0: step, loss, samples/s and ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, rate: float, eta: float) -> None:
        if not self.enabled:
            return
        m, s = divmod(int(eta), 60)
        line = f"step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} samples/s  ETA {m}m{s:02d}s"
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def to_device(item: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The collated item with its batches and tensors on ``device`` (lists stay)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in item.items()}


def _size(item: dict[str, Any]) -> tuple[int, int]:
    """Rows and real tokens of an item, read on the host (no device sync); an item of
    cached features (head-only fine-tuning) has rows only."""
    b = item.get("batch")
    if b is None:
        return len(item["ids"]), 0
    return len(b.input_ids), int(b.text_mask.sum() + b.region_mask.sum())


def _reduce_mean(values: dict[str, float], world: World) -> dict[str, float]:
    if world.size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return {k: v / world.size for k, v in zip(keys, t.tolist(), strict=True)}


def _logs(step: int, e) -> bool:
    return step % e.log_every == 0 or step == e.steps


def _grad_norm(module: torch.nn.Module) -> float:
    norms = [p.grad.detach().double().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _ds_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def train(
    engine,
    loader,
    cfg: Config,
    world: World,
    checkpointer: Checkpointer,
    log_path: Path,
    start_step: int = 0,
    evaluate: Callable[[], dict[str, float]] | None = None,
    observer: Observer | None = None,
    start_info: dict | None = None,
) -> Outcome:
    """Run optimizer steps from ``start_step`` to ``cfg.engine.steps``; each log record
    also goes to ``observer`` (Prometheus); ``start_info`` joins the start record."""
    e = cfg.engine
    stop = StopFlag(cfg.checkpoint.signal)
    progress = Progress(e.steps, world.is_main)
    batches = epochs(loader)
    log = open(log_path, "a") if world.is_main else None

    def write(record: dict) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    write({"event": "start", "step": start_step, "world_size": world.size, "time": time.time(),
           "job": os.environ.get("SLURM_JOB_ID", "local"), **(start_info or {})})  # fmt: skip
    step, last, skips, grad_norm = start_step, {}, 0, float("nan")
    # Loss sums stay on the device between log steps: no host sync for them in the step.
    window: dict[str, torch.Tensor] = {}
    window_steps, window_samples, window_time, window_wait = 0, 0, 0.0, 0.0
    window_rows, window_tokens = 0, 0
    try:
        while step < e.steps:
            t0 = time.perf_counter()
            wait, samples, stop_now, micro = 0.0, 0, False, 0
            while micro < e.grad_accum:
                tw = time.perf_counter()
                item = next(batches)
                wait += time.perf_counter() - tw
                rows, tokens = _size(item)
                losses = engine(to_device(item, world.device))
                # One small collective per micro-batch carries both flags (on the device,
                # as NCCL needs).
                flags = torch.stack(
                    [(~torch.isfinite(losses["loss"].detach())).float(),
                     torch.tensor(float(stop.raised), device=world.device)]
                )  # fmt: skip
                if world.size > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                flags = flags.tolist()
                stop_now = stop_now or bool(flags[1])
                if flags[0]:
                    bad = [k for k, v in losses.items() if not torch.isfinite(v).item()]
                    terms = ", ".join(bad) or "on another rank"
                    where = f"step {step + 1}: non-finite loss (terms: {terms})"
                    if e.on_nonfinite == "stop":
                        raise NonFiniteLoss(where + "; the last good checkpoint is kept")
                    skips += 1
                    if skips > MAX_SKIPS:
                        raise NonFiniteLoss(f"{where}; {MAX_SKIPS} micro-batches in a row skipped")
                    if world.is_main:
                        print(f"warning: {where}; micro-batch skipped", file=sys.stderr)
                    continue
                skips = 0
                engine.backward(losses["loss"])
                last_micro = micro == e.grad_accum - 1
                if last_micro and e.zero_stage == 0 and (_logs(step + 1, e) or stop_now):
                    # DeepSpeed keeps no global norm below ZeRO-1: take it here, where the
                    # gradients are whole (and averaged over ranks) before the step.
                    grad_norm = _grad_norm(engine.module)
                engine.step()
                micro += 1
                samples += len(item["ids"])
                window_rows += rows
                window_tokens += tokens
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + v.detach().double() / e.grad_accum
            step += 1
            window_steps += 1
            window_samples += samples * world.size
            window_time += time.perf_counter() - t0
            window_wait += wait
            if _logs(step, e) or stop_now:
                sums = {k: v.item() / window_steps for k, v in window.items()}
                means = _reduce_mean(
                    {**sums, "_rows": window_rows, "_tokens": window_tokens}, world
                )
                seconds = max(window_time, 1e-9)
                rows_per_s = means.pop("_rows") * world.size / seconds
                tokens_per_s = means.pop("_tokens") * world.size / seconds
                rate = window_samples / seconds
                record = {
                    "step": step,
                    **means,
                    "lr": engine.get_lr()[0],
                    "grad_norm": grad_norm if e.zero_stage == 0 else _ds_norm(engine),
                    "samples_per_s": rate,
                    "tokens_per_s": tokens_per_s,
                    "data_wait": window_wait / seconds,
                }
                if observer is not None:
                    mfu = observer.mfu(rows_per_s, world.size)
                    if mfu is not None:
                        record["mfu"] = mfu
                    record.update(observer.observe(record, means))
                last = means
                write(record)
                progress.update(
                    step, means["loss"], rate, (e.steps - step) * window_time / window_steps
                )
                window, window_steps, window_samples, window_time, window_wait = {}, 0, 0, 0.0, 0.0
                window_rows, window_tokens = 0, 0
            if evaluate is not None and e.eval_every and step % e.eval_every == 0:
                val = evaluate()
                write({"step": step, **{f"val_{k}": v for k, v in val.items()}})
            if stop_now:
                checkpointer.save(engine, step, loader.state_dict())
                return Outcome("preempted", step, last)
            if step % cfg.checkpoint.every == 0 or step == e.steps:
                checkpointer.save(engine, step, loader.state_dict())
        return Outcome("done", step, last)
    finally:
        stop.restore()
        progress.close()
        if log:
            log.close()


def validation_losses(module, loader, world: World, batches: int) -> dict[str, float]:
    """Mean pre-training losses over ``batches`` validation batches, leaving every random
    generator as it found it (so validation never changes the training trajectory)."""
    saved = rng_state()
    torch.manual_seed(12345)
    total: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for item in loader:
            if "batch" not in item:
                continue
            for k, v in module(to_device(item, world.device)).items():
                total[k] = total.get(k, 0.0) + v.item()
            n += 1
            if n == batches:
                break
    set_rng_state(saved)
    return _reduce_mean({k: v / max(n, 1) for k, v in total.items()}, world)
