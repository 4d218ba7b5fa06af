"""The GPU check as one prepared run (bench/gpu.sh starts it on a lent GPU):

1. the device, torch and DeepSpeed versions;
2. a scene world, then a 1-GPU pre-training of ``--steps`` steps in bf16 (ZeRO-2;
   ``--precision fp32`` for a dry run on a CPU without native bf16) with
   its ``/metrics`` endpoint on, scraped while it runs: ``cmal_mfu`` and
   ``cmal_gpu_utilization`` as Prometheus serves them;
3. save on signal and resume: the same run stopped by SIGUSR2 half-way (exit 75), then
   started again to its end;
4. ``bench/step.py`` at ``--size``, batch ``--batch``, bf16: samples/s, MFU against a
   measured matmul peak, engine/bare — and a torch.profiler summary of the engine's step.

    python bench/gpu.py                                  # on a GPU (8 minutes or less)
    python bench/gpu.py --device cpu --steps 2 --size tiny --batch 4 --images 64 \
        --pretrain-batch 4                               # dry run

Each part prints a heading and its numbers; the whole goes to ``$OUT/gpu.log`` too when
OUT is set. A part that fails prints why and the others still run; the exit status says
whether all passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRAPED = ("cmal_mfu", "cmal_gpu_utilization", "cmal_samples_per_s", "cmal_data_wait")


def say(text: str, log) -> None:
    print(text, flush=True)
    log.write(text + "\n")
    log.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmal(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cmal.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_steps(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    if not log.is_file():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]


def pretrain_args(args, world: Path, runs: Path, name: str, steps: int, every: int) -> list[str]:
    over = [
        f"name={name}",
        f"data.remote={world}/shards/pretrain/train",
        "data.val_remote=null",
        f"data.local={runs}/cache-{name}",
        "data.workers=2",
        f"engine.steps={steps}",
        f"engine.log_every={every}",
        "engine.eval_every=0",
        "engine.zero_stage=2",
        f"engine.precision={args.precision}",
        f"engine.device={args.device}",
        f"checkpoint.root={runs}",
        f"checkpoint.every={steps}",
        f"observe.peak_tflops={args.peak}",
        *([f"data.batch_size={args.pretrain_batch}"] if args.pretrain_batch else []),
    ]
    return ["pretrain", "-c", args.config, *over]


def part_pretrain(args, world: Path, runs: Path, log) -> bool:
    port = free_port()
    every = max(1, args.steps // 5)
    p = cmal(*pretrain_args(args, world, runs, "gpu-pretrain", args.steps, every),
             f"observe.port={port}")  # fmt: skip
    seen: dict[str, str] = {}
    while p.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
            for line in text.splitlines():
                if line.startswith(SCRAPED):
                    seen[line.rsplit(" ", 1)[0]] = line
        except OSError:
            pass  # not up yet, or gone
        time.sleep(0.5)
    out, err = p.communicate()
    rows = logged_steps(runs / "gpu-pretrain")
    for r in rows:
        keep = ("step", "loss", "samples_per_s", "tokens_per_s", "data_wait", "mfu", "grad_norm")
        say("  " + json.dumps({k: r[k] for k in keep if k in r}), log)
    say("  scraped from /metrics while it ran:", log)
    for line in sorted(seen.values()):
        say(f"    {line}", log)
    missing = [m for m in ("cmal_mfu", "cmal_gpu_utilization") if not any(
        v.startswith(m) for v in seen.values())]  # fmt: skip
    if missing:
        say(f"  not served: {', '.join(missing)}", log)
    # NVML exists on a GPU machine only; MFU everywhere (against the measured peak).
    ok = p.returncode == 0 and len(rows) > 0 and "cmal_mfu" not in missing
    if args.device == "cuda":
        ok = ok and not missing
    if p.returncode != 0:
        say(f"  exit {p.returncode}: {err[-1500:]}", log)
    return ok


def part_signal(args, world: Path, runs: Path, log) -> bool:
    run = runs / "gpu-signal"
    # At least 8 steps, so the signal (after half of --steps) lands before the end.
    steps, half = max(args.steps, 8), max(1, args.steps // 2)
    cmd = pretrain_args(args, world, runs, "gpu-signal", steps, 1)
    p = cmal(*cmd)
    while p.poll() is None and not any(r["step"] >= half for r in logged_steps(run)):
        time.sleep(0.2)
    p.send_signal(signal.SIGUSR2)
    _, err = p.communicate()
    stopped = [d.name for d in sorted((run / "checkpoints").glob("step_*"))]
    say(f"  SIGUSR2 after step {half}: exit {p.returncode} (75 asks for a requeue), "
        f"checkpoints {stopped}", log)  # fmt: skip
    q = cmal(*cmd)
    _, err2 = q.communicate()
    resumed = [x for x in err2.splitlines() if x.startswith("# resumed")]
    logged = sorted({r["step"] for r in logged_steps(run)})
    say(f"  started again: exit {q.returncode}; {resumed[0] if resumed else 'no resume line'}; "
        f"logged steps {logged[0]}..{logged[-1]} ({len(logged)})", log)  # fmt: skip
    if q.returncode != 0:
        say(f"  {err2[-1500:]}", log)
    return p.returncode == 75 and q.returncode == 0 and bool(resumed) and logged[-1] == steps


def part_step(args, log) -> bool:
    cmd = [sys.executable, str(ROOT / "bench/step.py"), "--size", args.size, "--batch",
           args.batch, "--steps", str(args.step_steps), "--warmup", str(args.warmup),
           "--peak", str(args.peak), "--profile", "3", *(["--skip-bert"] if args.skip_bert else []),
           f"engine.precision={args.precision}", f"engine.device={args.device}"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in res.stdout.splitlines():
        say("  " + line, log)
    if res.returncode != 0:
        say(f"  exit {res.returncode}: {res.stderr[-1500:]}", log)
    return res.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--steps", type=int, default=50, help="pre-training steps")
    ap.add_argument("--images", type=int, default=400, help="scene world size")
    ap.add_argument("--size", default="base", help="bench/step.py model size")
    ap.add_argument("--batch", default="256,512", help="bench/step.py batch sizes")
    ap.add_argument(
        "--config",
        default=str(ROOT / "configs/pretrain/world.yaml"),
        help="the pre-training config (the world's small model by default)",
    )
    ap.add_argument("--pretrain-batch", type=int, default=None,
                    help="pre-training batch (default: the world config's 32)")  # fmt: skip
    ap.add_argument("--step-steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip-bert", action="store_true")
    ap.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp32"),
        help="fp32 for a dry run on a CPU without native bf16 (emulated bf16 is ~10x slower)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.device == "cpu":
        args.step_steps, args.warmup, args.skip_bert = 2, 1, True

    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with open(out / "gpu.log", "w") as log, tempfile.TemporaryDirectory() as tmp:
        import torch

        sys.path.insert(0, str(ROOT / "bench"))
        from step import matmul_peak

        name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        import deepspeed

        say(f"# {name}; torch {torch.__version__}; deepspeed {deepspeed.__version__}; "
            f"python {sys.version.split()[0]}", log)  # fmt: skip
        # 3 significant digits, not 2 decimals: a busy CPU measures < 0.005 TFLOP/s, which
        # rounded to 0.0 and turned MFU off (observe reads a 0 peak as none given).
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        args.peak = float(f"{matmul_peak(torch.device(args.device), dtype):.3g}")
        say(f"# measured {args.precision} matmul peak: {args.peak} TFLOP/s (MFU is against it)",
            log)  # fmt: skip
        world, runs = Path(tmp) / "world", Path(tmp) / "runs"
        t = time.time()
        res = subprocess.run(
            [sys.executable, "-m", "cmal.cli", "data", "world", "--out", str(world),
             "--images", str(args.images)],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        say(f"# world of {args.images} images: exit {res.returncode} ({time.time() - t:.0f} s)",
            log)  # fmt: skip
        if res.returncode != 0:
            say(res.stderr[-1500:], log)
            return 1
        for title, part in (
            (f"pre-training, {args.precision}, ZeRO-2, metrics",
             lambda: part_pretrain(args, world, runs, log)),
            ("save on signal, then resume", lambda: part_signal(args, world, runs, log)),
            (f"bench/step.py, {args.precision}", lambda: part_step(args, log)),
        ):  # fmt: skip
            t = time.time()
            say(f"## {title}", log)
            results[title] = part()
            say(f"## {title}: {'ok' if results[title] else 'FAILED'} ({time.time() - t:.0f} s)",
                log)  # fmt: skip
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
