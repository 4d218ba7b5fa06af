"""The training loop: step, accumulate, log, evaluate, save — and save-on-signal at a step
boundary with the flag all-reduced, so every rank saves together.

The loop never knows which task it trains: it is given a module whose forward takes a
collated item (``cmal.data.batches.Collate``) and returns a dict of losses with the total
under ``"loss"``, and a loader of such items.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cmal.config import Config
from cmal.data.errors import DataError
from cmal.engine.checkpoint import Checkpointer, rng_state, set_rng_state
from cmal.engine.deepspeed import World
from cmal.engine.syncs import HostReads

if TYPE_CHECKING:
    from cmal.engine.observe import Observer

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
    """Rows and real tokens of an item, as the collate function counted them on the host;
    an item of cached features (head-only fine-tuning) has rows only."""
    return len(item["ids"]), item.get("tokens", 0)


def _reduce_mean(values: dict[str, float], world: World) -> dict[str, float]:
    if world.size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return {k: v / world.size for k, v in zip(keys, t.tolist(), strict=True)}


def _logs(step: int, e) -> bool:
    return step % e.log_every == 0 or step == e.steps


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The global gradient norm, left on the device."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double())


def _ds_norm(engine) -> torch.Tensor | float:
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else norm


class Window:
    """What the loop owes the host since its last read: each micro-batch's non-finite
    flags and the loss sums stay on the device (no sync in a step) until :meth:`read`
    fetches them, with the stop flag and the host counts, in one all-reduce and one copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.flags: list[torch.Tensor] = []
        self.draws: list[tuple[int, int]] = []  # (step, draw) of each flag row
        self.clear()

    def clear(self) -> None:
        """Start a new log window (flags not yet read stay)."""
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.samples = self.rows = self.tokens = 0
        self.time = self.wait = 0.0

    def add(self, losses: dict[str, torch.Tensor], step: int, draw: int, accum: int) -> None:
        self.names = list(losses)
        detached = [v.detach() for v in losses.values()]
        self.flags.append(torch.stack([~torch.isfinite(v) for v in detached]))
        self.draws.append((step, draw))
        for k, v in zip(self.names, detached, strict=True):
            self.sums[k] = self.sums.get(k, 0.0) + v.double() / accum

    def read(self, world: World, stop: bool, grad_norm) -> tuple[list, bool, dict[str, float]]:
        """The one host read: (the non-finite micro-batches as (step, draw, terms), whether
        any rank was signalled, the window's losses averaged over its steps and the ranks,
        with ``grad_norm``, and ``_rows``/``_tokens`` per rank)."""
        keys = sorted(self.sums)
        head = torch.tensor([float(stop), self.rows, self.tokens], dtype=torch.float64)
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(grad_norm)
        parts = [head, *(self.sums[k].reshape(1) for k in keys), norm.reshape(1)]
        if self.flags:
            parts.append(torch.stack(self.flags).flatten().double())
        t = torch.cat([x.to(self.device, torch.float64) for x in parts])
        if world.size > 1:
            dist.all_reduce(t)
        values, n = t.tolist(), world.size
        per_step = n * max(self.steps, 1)  # the sums run over the window's steps
        means = {k: v / per_step for k, v in zip(keys, values[3 : 3 + len(keys)], strict=True)}
        means |= {"grad_norm": values[3 + len(keys)] / n, "_rows": values[1] / n,
                  "_tokens": values[2] / n}  # fmt: skip
        flags = values[4 + len(keys) :]
        width, bad = len(self.names), []
        for i, (step, draw) in enumerate(self.draws):
            row = flags[i * width : (i + 1) * width]
            if any(row):
                bad.append((step, draw, [k for k, v in zip(self.names, row, strict=True) if v]))
        self.flags, self.draws = [], []
        return bad, values[0] > 0, means


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
    also goes to ``observer`` (Prometheus); ``start_info`` joins the start record.

    A step reads nothing from the device. The non-finite flags, the signal and the log's
    numbers are read together every ``engine.check_every`` steps and at each log and save
    step (a save follows a clean read only). A non-finite micro-batch then stops the run
    (``on_nonfinite=stop``), or (``skip``) the run goes back to its newest checkpoint and
    trains on from there without that micro-batch.
    """
    e = cfg.engine
    stop = StopFlag(cfg.checkpoint.signal)
    progress = Progress(e.steps, world.is_main)
    batches = epochs(loader)
    log = open(log_path, "a") if world.is_main else None
    reads = HostReads() if e.count_host_reads else None

    def section(name: str):
        return reads.section(name) if reads is not None else nullcontext()

    def write(record: dict) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def save() -> None:
        with section("save"):
            checkpointer.save(engine, step, loader.state_dict())

    write({"event": "start", "step": start_step, "world_size": world.size, "time": time.time(),
           "job": os.environ.get("SLURM_JOB_ID", "local"), **(start_info or {})})  # fmt: skip
    step, last, grad_norm = start_step, {}, float("nan")
    window = Window(world.device)
    # Draws from the loader since the newest checkpoint, and those a rewind leaves out.
    draw, skip = 0, set()
    if e.on_nonfinite == "skip" and checkpointer.newest() is None:
        save()  # a point to go back to
    try:
        with reads if reads is not None else nullcontext():
            while step < e.steps:
                t0 = time.perf_counter()
                wait, samples, micro = 0.0, 0, 0
                while micro < e.grad_accum:
                    tw = time.perf_counter()
                    with section("data"):
                        item = next(batches)
                    wait += time.perf_counter() - tw
                    draw += 1
                    if draw in skip:
                        continue
                    with section("step"):
                        rows, tokens = _size(item)
                        losses = engine(to_device(item, world.device))
                        window.add(losses, step + 1, draw, e.grad_accum)
                        engine.backward(losses["loss"])
                        if micro == e.grad_accum - 1 and e.zero_stage == 0 and _logs(step + 1, e):
                            # DeepSpeed keeps no global norm below ZeRO-1: take it here, where
                            # the gradients are whole (and averaged over ranks).
                            grad_norm = _grad_norm(engine.module)
                        engine.step()
                    micro += 1
                    samples += len(item["ids"])
                    window.rows += rows
                    window.tokens += tokens
                step += 1
                window.steps += 1
                window.samples += samples * world.size
                window.time += time.perf_counter() - t0
                window.wait += wait
                saving = step % cfg.checkpoint.every == 0 or step == e.steps
                due = _logs(step, e) or saving or step % e.check_every == 0
                if not (due or (world.size == 1 and stop.raised)):
                    write_reads(write, reads, step)
                    continue
                with section("check"):
                    norm = grad_norm if e.zero_stage == 0 else _ds_norm(engine)
                    bad, stop_now, means = window.read(world, stop.raised, norm)
                if bad:
                    at, _, terms = bad[0]
                    where = f"step {at}: non-finite loss (terms: {', '.join(terms)})"
                    if e.on_nonfinite == "stop":
                        raise NonFiniteLoss(where + "; the last good checkpoint is kept")
                    skip |= {d for _, d, _ in bad}
                    if len(skip) > MAX_SKIPS:
                        raise NonFiniteLoss(f"{where}; over {MAX_SKIPS} micro-batches skipped")
                    batches.close()
                    step, draw = _rewind(engine, loader, checkpointer), 0
                    batches = epochs(loader)
                    window.clear()
                    if world.is_main:
                        print(f"warning: {where}; back to step {step}, without that "
                              "micro-batch", file=sys.stderr)  # fmt: skip
                    continue
                if _logs(step, e) or stop_now:
                    last = _record(step, means, window, engine, cfg, world, observer, write)
                    progress.update(step, means["loss"], last.pop("_rate"),
                                    (e.steps - step) * window.time / window.steps)  # fmt: skip
                    window.clear()
                if evaluate is not None and e.eval_every and step % e.eval_every == 0:
                    with section("eval"):
                        val = evaluate()
                    write({"step": step, **{f"val_{k}": v for k, v in val.items()}})
                if stop_now or saving:
                    save()
                    draw, skip = 0, set()
                write_reads(write, reads, step)
                if stop_now:
                    return Outcome("preempted", step, last)
        return Outcome("done", step, last)
    finally:
        stop.restore()
        progress.close()
        if log:
            log.close()


def _record(step, means, window: Window, engine, cfg: Config, world: World, observer, write):
    """Write the log record of ``window`` (and hand it to ``observer``); returns its losses
    with the samples/s under ``_rate``."""
    seconds = max(window.time, 1e-9)
    rows_per_s = means.pop("_rows") * world.size / seconds
    tokens_per_s = means.pop("_tokens") * world.size / seconds
    grad_norm = means.pop("grad_norm")
    rate = window.samples / seconds
    record = {
        "step": step,
        **means,
        "lr": engine.get_lr()[0],
        "grad_norm": grad_norm,
        "samples_per_s": rate,
        "tokens_per_s": tokens_per_s,
        "data_wait": window.wait / seconds,
    }
    if observer is not None:
        mfu = observer.mfu(rows_per_s, world.size)
        if mfu is not None:
            record["mfu"] = mfu
        record.update(observer.observe(record, means))
    write(record)
    return {**means, "_rate": rate}


def _rewind(engine, loader, checkpointer: Checkpointer) -> int:
    """Load the newest checkpoint (engine, RNG, data position); returns its step."""
    newest = checkpointer.newest()
    state = checkpointer.read_state(newest, force=True)
    checkpointer.load(engine, newest, state)
    loader.load_state_dict(state["data"])
    return state["step"]


def write_reads(write, reads: HostReads | None, step: int) -> None:
    """The step's device-to-host reads, by section, as a log record (``count_host_reads``)."""
    if reads is None:
        return
    taken = reads.take_all()
    taken.pop("data", None)  # the host's own tensors (collate without workers)
    sections = {name: [] for name in ("step", "check", "save", "eval")}
    sections |= {name: [[r.op, r.where] for r in rs] for name, rs in taken.items()}
    write({"event": "host_reads", "step": step, "reads": sections})


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
