"""The pre-training step, side by side on one machine: (a) CMAL through our DeepSpeed
engine, (b) the same model and batch in a bare torch loop (no DeepSpeed, no logging), and
(c) a plain BERT-base-shaped encoder (transformers' BertForMaskedLM, MLM on 15% of the
tokens) at the same sequence length.

    python bench/step.py --size small --batch 16                        # CPU
    python bench/step.py --size base --batch 256,512 --peak measure     # GPU (bench/gpu.sh)
    python bench/step.py --size small --batch 16 engine.compile=true    # config overrides

Prints samples/s, TFLOP/s (analytic FLOPs, as `cmal model summary` counts them) and MFU
(against ``--peak`` TFLOP/s, or a bf16 matmul measured first) for each, a table of all
batch sizes, and last, per batch, the throughput ratio a/c and ``engine/bare step-time
ratio: X`` (<= 1.05 is the bar). It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def timed(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step, after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def autocast(world):
    return torch.autocast(world.device.type, torch.bfloat16, enabled=world.dtype != torch.float32)


def engine_step(cfg, world, batch):
    from cmal.engine.deepspeed import build_engine
    from cmal.model.pretrained import build_model
    from cmal.workflow.pretrain import PretrainObjective

    engine, _ = build_engine(PretrainObjective(build_model(cfg.model)), cfg, world)
    item = {"batch": batch.to(world.device)}

    def step():
        losses = engine(item)
        engine.backward(losses["loss"])
        engine.step()

    return step, engine.module.model


def bare_step(cfg, world, batch):
    """The same model, optimizer, schedule and clipping in plain torch."""
    from cmal.engine.deepspeed import lr_lambda, param_groups
    from cmal.model.pretrained import build_model
    from cmal.workflow.pretrain import PretrainObjective

    model = PretrainObjective(build_model(cfg.model)).to(world.device)
    if cfg.engine.compile:
        model.compile(dynamic=True)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps, fused=True)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    item = {"batch": batch.to(world.device)}

    def step():
        with autocast(world):
            loss = model(item)["loss"]
        loss.backward()
        if cfg.engine.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.engine.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def bert_step(world, n: int, seq: int):
    """BERT-base (110M) MLM step; returns (step, training FLOPs per sample)."""
    from transformers import BertConfig, BertForMaskedLM

    from cmal.model.transformer import matmul_flops

    conf = BertConfig(attn_implementation="sdpa")
    model = BertForMaskedLM(conf).to(world.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(1000, 20000, (n, seq), device=world.device)
    labels = torch.full_like(ids, -100)
    sites = torch.rand(ids.shape, device=world.device) < 0.15
    labels[sites] = ids[sites]

    def step():
        with autocast(world):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    d = conf.hidden_size
    # HF's MLM head predicts every position; the loss keeps 15%: count what it computes.
    fwd = matmul_flops(conf.num_hidden_layers, d, conf.intermediate_size, seq)
    fwd += seq * 2 * (d * d + d * conf.vocab_size)
    return step, 3 * fwd


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """Measured dense matmul TFLOP/s (best of 5 timings of ``reps`` n x n x n products):
    the peak MFU is taken against, as the performance issue asks."""
    n = n if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(timed(lambda: a @ b, 3, reps, device) for _ in range(5))
    return 2 * n**3 / best / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="configs/model/<size>.yaml")
    ap.add_argument("--batch", default="16", help="batch size(s), comma-separated")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--zero", type=int, default=0, help="ZeRO stage of the engine")
    ap.add_argument(
        "--peak", default=None, help="device peak TFLOP/s for MFU, or 'measure' (a matmul)"
    )
    ap.add_argument("--skip-bert", action="store_true")
    ap.add_argument("--profile", type=int, default=0, help="profile this many engine steps")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. engine.compile=true")
    args = ap.parse_args()

    from conftest import random_batch

    from cmal.config import load_config
    from cmal.engine.deepspeed import init_world

    batches = [int(b) for b in args.batch.split(",")]

    def config(n: int):
        return load_config(
            ROOT / f"configs/model/{args.size}.yaml",
            [f"engine.zero_stage={args.zero}", f"data.batch_size={n}", *args.overrides],
        )

    # The overrides reach the world (engine.precision, engine.device) and the model too.
    cfg = config(batches[0])
    world = init_world(cfg)
    dev = torch.cuda.get_device_name() if world.device.type == "cuda" else "CPU"
    peak = args.peak and (
        matmul_peak(world.device, world.dtype) if args.peak == "measure" else float(args.peak)
    )
    if peak:
        print(f"{dev}: matmul peak {peak:.1f} TFLOP/s ({world.dtype})", flush=True)
    m = cfg.model
    rows, ratios = [], []
    for n in batches:
        cfg = config(n)
        batch = random_batch(m, n=n, text_len=m.max_text_len, regions=m.max_regions)

        def run(step) -> float:
            return timed(step, args.warmup, args.steps, world.device)

        step_a, model = engine_step(cfg, world, batch)
        flops = model.flops_per_sample(m.max_text_len, m.max_regions, batch_size=n)
        mine = [(n, "a: CMAL, our engine", run(step_a), flops)]
        del step_a, model
        mine.append((n, "b: CMAL, bare torch", run(bare_step(cfg, world, batch)), flops))
        if not args.skip_bert:
            step_c, bflops = bert_step(world, n, m.max_text_len + m.max_regions)
            mine.append((n, "c: BERT-base MLM", run(step_c), bflops))
        for row in mine:
            print(row, flush=True)  # progress, in case a later batch runs out of memory
        rows += mine
        bert = mine[2][2] / mine[0][2] if len(mine) == 3 else None
        ratios.append((n, mine[0][2] / mine[1][2], bert))

    print(f"\n{dev}, {args.size}, ZeRO {args.zero}, {world.dtype}, {' '.join(args.overrides)}")
    print("| batch | step | s/step | samples/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for n, name, sec, f in rows:
        tflops = n * f / sec / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "-"
        print(f"| {n} | {name} | {sec:.4f} | {n / sec:.1f} | {tflops:.3f} | {mfu} |")
    for n, bare, bert in ratios:
        if bert is not None:
            print(f"batch {n}: engine/BERT-base throughput ratio: {bert:.3f}")
        print(f"batch {n}: engine/bare step-time ratio: {bare:.3f}")
    if args.profile:
        n = batches[0]
        batch = random_batch(m, n=n, text_len=m.max_text_len, regions=m.max_regions)
        step, _ = engine_step(config(n), world, batch)
        print(f"\ntorch.profiler, {args.profile} engine steps at batch {n}:")
        print(profile_summary(step, args.profile, world.device))


def profile_summary(step, steps: int, device: torch.device) -> str:
    """The ops that took the most time over ``steps`` steps (after one more to warm up)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=48)


if __name__ == "__main__":
    main()
