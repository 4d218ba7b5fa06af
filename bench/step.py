"""The pre-training step, side by side on one machine: (a) CMAL through our DeepSpeed
engine, (b) the same model and batch in a bare torch loop (no DeepSpeed, no logging), and
(c) a plain BERT-base-shaped encoder (transformers' BertForMaskedLM, MLM on 15% of the
tokens) at the same sequence length.

    python bench/step.py --size small --batch 16            # CPU
    python bench/step.py --size base --batch 256 --peak 781  # GPU (TFLOP/s for MFU)

Prints samples/s, TFLOP/s (analytic FLOPs, as `cmal model summary` counts them) and MFU
for each, and last ``engine/bare step-time ratio: X`` (<= 1.05 is the bar) and the
throughput ratio a/c. It measures; it asserts nothing.
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
    from cmal.pretrained import build_model
    from cmal.stages import PretrainObjective

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
    from cmal.pretrained import build_model

    model = build_model(cfg.model).to(world.device)
    o, cuda = cfg.optim, world.device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps, fused=cuda)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    batch = batch.to(world.device)

    def step():
        with autocast(world):
            loss = model.pretrain_losses(batch)["loss"]
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=world.device.type == "cuda")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="configs/model/<size>.yaml")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--zero", type=int, default=0, help="ZeRO stage of the engine")
    ap.add_argument("--peak", type=float, default=None, help="device peak TFLOP/s for MFU")
    ap.add_argument("--skip-bert", action="store_true")
    args = ap.parse_args()

    from conftest import random_batch

    from cmal.config import load_config
    from cmal.engine.deepspeed import init_world

    cfg = load_config(
        ROOT / f"configs/model/{args.size}.yaml",
        [f"engine.zero_stage={args.zero}", f"data.batch_size={args.batch}"],
    )
    world = init_world(cfg)
    m = cfg.model
    batch = random_batch(cfg.model, n=args.batch, text_len=m.max_text_len, regions=m.max_regions)

    def run(step) -> float:
        return timed(step, args.warmup, args.steps, world.device)

    step_a, model = engine_step(cfg, world, batch)
    flops = model.flops_per_sample(m.max_text_len, m.max_regions)
    rows = [("a: CMAL, our engine", run(step_a), flops)]
    rows.append(("b: CMAL, bare torch", run(bare_step(cfg, world, batch)), flops))
    if not args.skip_bert:
        step_c, bflops = bert_step(world, args.batch, m.max_text_len + m.max_regions)
        rows.append(("c: BERT-base MLM", run(step_c), bflops))

    dev = torch.cuda.get_device_name() if world.device.type == "cuda" else "CPU"
    print(f"\n{dev}, {args.size}, batch {args.batch}, ZeRO {args.zero}, {world.dtype}")
    print("| step | s/step | samples/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    for name, sec, f in rows:
        tflops = args.batch * f / sec / 1e12
        mfu = f"{tflops / args.peak:.1%}" if args.peak else "-"
        print(f"| {name} | {sec:.4f} | {args.batch / sec:.1f} | {tflops:.3f} | {mfu} |")
    if len(rows) == 3:
        print(f"engine/BERT-base throughput ratio: {rows[2][1] / rows[0][1]:.3f}")
    print(f"engine/bare step-time ratio: {rows[0][1] / rows[1][1]:.3f}")


if __name__ == "__main__":
    main()
