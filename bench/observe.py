"""What Prometheus metrics cost a training run: the same short pre-training run with
metrics off and on (a /metrics endpoint and a Pushgateway push every log step), in
alternating pairs, and the cost of one ``Observer.observe`` call beside the step time.

    python bench/observe.py [--pairs 3] [--steps 60]

Prints the table and the ratios; it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(cfg: dict, folder: Path, name: str) -> list[float]:
    """Per-log-record samples/s of one `cmal pretrain` run (first record left out)."""
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": name}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "cmal.cli", "pretrain", "-c", str(path)],
        cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rows = [json.loads(x) for x in (folder / "runs" / name / "log.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in rows if "loss" in r][1:]


def observe_call_seconds(n: int = 2000) -> float:
    import torch

    from cmal.config import ObserveConfig
    from cmal.engine.observe import Observer

    obs = Observer(ObserveConfig(), "bench", "pretrain", 0, 0, torch.device("cpu"), 0, 1e9)
    record = {"step": 1, "lr": 1e-4, "grad_norm": 1.0, "samples_per_s": 30.0,
              "tokens_per_s": 900.0, "data_wait": 0.01}  # fmt: skip
    losses = {"loss": 2.0, "amc": 1.0, "mlm": 0.5, "itm": 0.5}
    start = time.perf_counter()
    for i in range(n):
        record["step"] = i
        obs.observe(record, losses)
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()

    from conftest import _free_port

    from cmal.data.convert.world import convert_world
    from cmal.data.world import WorldConfig, generate
    from cmal.model.pretrained import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="cmal-bench-observe-"))
    generate(tmp / "world", WorldConfig(images=200, seed=1, workers=1))
    convert_world(tmp / "world", tmp / "world/shards", load_tokenizer())
    gw_port = _free_port()
    gw = subprocess.Popen(
        ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{gw_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = {
        "base": str(ROOT / "configs/pretrain/world.yaml"),
        "data": {"remote": str(tmp / "world/shards/pretrain/train"), "workers": 1},
        "engine": {"steps": args.steps, "log_every": 1, "eval_every": 0},
        "checkpoint": {"root": str(tmp / "runs"), "every": 100000},
    }
    on = {**base, "observe": {"port": _free_port(), "pushgateway": f"http://127.0.0.1:{gw_port}",
                              "push_every_s": 0.001}}  # fmt: skip
    rates = {"off": [], "on": []}
    try:
        for i in range(args.pairs):
            for label, cfg in (("off", base), ("on", on)):
                rates[label].append(statistics.median(run(cfg, tmp, f"{label}{i}")))
    finally:
        gw.terminate()
        gw.wait()
    per_call = observe_call_seconds()
    off, on_ = statistics.median(rates["off"]), statistics.median(rates["on"])
    step_s = 1 / off * 32  # batch 32 in configs/pretrain/world.yaml
    print("| metrics | samples/s per pair | median |")
    print("|---|---|---|")
    for label in ("off", "on"):
        runs = ", ".join(f"{r:.2f}" for r in rates[label])
        print(f"| {label} | {runs} | {statistics.median(rates[label]):.2f} |")
    print(f"\non / off = {on_ / off:.4f}")
    print(
        f"one Observer.observe call: {per_call * 1e6:.1f} us = {per_call / step_s:.5f} "
        f"of a {step_s * 1e3:.0f} ms step"
    )


if __name__ == "__main__":
    main()
