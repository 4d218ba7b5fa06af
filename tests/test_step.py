"""The training step as a GPU will run it, checked on the CPU: a step reads nothing from
the device (``engine.count_host_reads``), both bf16 modes run, torch.compile traces
forward and backward without a graph break, and the non-finite guard, read late, still
keeps the last clean checkpoint (stop) or goes back to it without the bad batch (skip)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import random_batch, tiny_config
from test_engine import finish, launch, losses, write_config

# DeepSpeed's ZeRO-1/2 optimizer tests the gradients for inf/NaN on the host every step
# (stage_1_and_2.py: has_overflow, then utils.is_invalid_grad_norm three times): 4 reads
# inside DeepSpeed, which our code adds nothing to.
DEEPSPEED_ZERO_CHECK = "deepspeed/runtime/"


def host_reads(run) -> list[dict]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "host_reads"]


def test_the_counter_sees_each_kind_of_read():
    """HostReads, which the step tests rely on, records what would stop a GPU's host —
    and nothing for work that stays on the device."""
    from cmal.engine.syncs import HostReads

    x = torch.randn(4, 3, requires_grad=True)
    with HostReads() as reads:
        with reads.section("quiet"):
            y = (x @ x.t()).relu().sum()
            y.backward()
            torch.where(x > 0, x, 0).gather(1, torch.zeros(4, 1, dtype=torch.long))
        with reads.section("loud"):
            v = y.detach()
            v.item(), float(v), bool(v > 0), x.tolist()
            x.nonzero()
            x[x > 0]
    taken = reads.take_all()
    assert "quiet" not in taken
    ops = [r.op for r in taken["loud"]]
    assert ops == ["aten::_local_scalar_dense"] * 3 + ["Tensor.tolist", "aten::nonzero",
                                                        "aten::index (boolean index)"]  # fmt: skip
    assert all("test_step.py" in r.where for r in taken["loud"])
    x.tolist()  # outside the mode: its wrapper is gone
    assert reads.take_all() == {}


@pytest.mark.parametrize(
    "ranks, engine, allowed",
    [
        (2, {}, 0),
        (1, {"precision": "bf16"}, 0),
        (1, {"precision": "bf16", "bf16_mode": "deepspeed", "zero_stage": 2}, 4),
    ],
    ids=["fp32-zero0-2ranks", "bf16-autocast-zero0", "bf16-deepspeed-zero2"],
)
def test_steps_read_nothing_from_the_device(world, tmp_path, ranks, engine, allowed):
    cfg = write_config(
        tmp_path,
        world,
        name="reads",
        engine={"steps": 6, "log_every": 3, "check_every": 3, "count_host_reads": True, **engine},
    )
    assert finish(launch(cfg, ranks)) == [0] * ranks
    records = host_reads(tmp_path / "runs/reads")  # rank 0's
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        step = r["reads"]["step"]
        ours = [x for x in step if DEEPSPEED_ZERO_CHECK not in x[1]]
        assert ours == [], f"step {r['step']} read from the device: {ours}"
        assert len(step) == allowed, step
        # A log step reads once: flags, signal and the window's numbers together.
        assert len(r["reads"]["check"]) == (r["step"] % 3 == 0), r["reads"]["check"]
    logged = [json.loads(x) for x in (tmp_path / "runs/reads/log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x] == [3, 6]
    assert all(math.isfinite(x["loss"]) and x["grad_norm"] > 0 for x in logged if "loss" in x)


def test_a_log_record_is_the_mean_of_its_steps(world, tmp_path):
    """Logging and checking every 3 steps instead of every step changes no number: each
    record holds the mean of its window's per-step losses."""
    runs = {}
    for every in (1, 3):
        engine = {"steps": 6, "log_every": every, "check_every": every}
        root = {"root": str(tmp_path / f"r{every}")}
        cfg = write_config(tmp_path, world, name="mean", engine=engine, checkpoint=root)
        assert finish(launch(cfg, 1)) == [0]
        runs[every] = losses(tmp_path / f"r{every}/mean")
    each, windows = runs[1], runs[3]
    assert sorted(windows) == [3, 6]
    for end in (3, 6):
        mean = sum(each[s] for s in range(end - 2, end + 1)) / 3
        assert windows[end] == pytest.approx(mean, rel=1e-12)


@pytest.mark.slow  # ~80 s: AOT tracing at symbolic shapes, as engine.compile does
def test_compiled_step_has_no_graph_break():
    """The pre-training losses trace as one graph (AMC, MLM, ITM and the prompt layer's
    draws in fixed shapes): ``fullgraph`` raises at a graph break, naming its reason; the
    backward is traced too, at two text lengths."""
    from cmal.model.cmal import CMAL
    from cmal.workflow.pretrain import PretrainObjective

    cfg = tiny_config().model
    module = PretrainObjective(CMAL(cfg).train())
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", dynamic=True, fullgraph=True)
    for text_len in (16, 11):
        module.zero_grad()
        losses = compiled({"batch": random_batch(cfg, n=4, text_len=text_len, regions=8)})
        assert set(losses) == {"loss", "amc", "mlm", "itm"}
        losses["loss"].backward()
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_nonfinite_found_late_keeps_the_last_clean_checkpoint(world, tmp_path):
    """Step 7's loss is NaN; the flags are read at step 10, before its save: the error
    names step 7 and the step-5 checkpoint stays the newest."""
    cfg = write_config(
        tmp_path,
        world,
        name="late",
        engine={"steps": 20, "log_every": 5, "check_every": 5},
        checkpoint={"every": 5},
    )
    (p,) = launch(cfg, 1, entry="tests/poison.py", env={"POISON_DRAW": "7"})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, err[-2000:]
    assert "error: step 7: non-finite loss (terms: " in err
    assert "the last good checkpoint is kept" in err
    ck = tmp_path / "runs/late/checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000005"
    assert sorted(x.name for x in ck.glob("step_*")) == ["step_00000005"]


def test_skip_goes_back_to_the_checkpoint_without_the_bad_batch(world, tmp_path):
    """Two ranks, each with its third batch poisoned: found at step 4, both go back to
    the step-2 checkpoint, leave that batch out and finish with finite losses."""
    cfg = write_config(
        tmp_path,
        world,
        name="skip",
        engine={"steps": 8, "log_every": 4, "check_every": 4, "on_nonfinite": "skip"},
        checkpoint={"every": 2},
    )
    procs = launch(cfg, 2, entry="tests/poison.py", env={"POISON_DRAW": "3"})
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    err = outs[0][1]
    assert "warning: step 3: non-finite loss (terms: " in err and "back to step 2" in err
    for out, _ in outs:  # each rank's poisoned batch ran once, never again after going back
        assert out.count("poisoned ") == 1, out
    rows = [json.loads(x) for x in (tmp_path / "runs/skip/log.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(logged) == [4, 8] and all(math.isfinite(v) for v in logged.values())
    assert (tmp_path / "runs/skip/checkpoints/latest").read_text().strip() == "step_00000008"


@pytest.mark.slow  # a world, three trainings and the step bench
def test_gpu_script_dry_run_on_the_cpu(tmp_path):
    """bench/gpu.sh, the script a lent GPU runs, end to end on the CPU at tiny sizes:
    world, bf16 (fp32 on a CPU without native bf16) ZeRO-2 pre-training scraped for cmal_mfu,
    save on signal and resume, bench/step.py with the profiler."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT

    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    # bf16 where the CPU computes it (AVX-512 BF16, AMX); emulated (AVX2 only) one bf16 run
    # of this script took over 10 minutes, so there the flow runs in fp32 (the bf16 modes
    # themselves are covered by test_steps_read_nothing_from_the_device).
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    precision = "bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32"
    # The tiny model pre-trains (the world's small one takes ~4 s a step here, in fp32).
    tiny = write_config(tmp_path, tmp_path / "unused", name="gpu")
    args = ["--device", "cpu", "--steps", "20", "--size", "tiny", "--batch", "4", "--images", "64",
            "--config", tiny, "--pretrain-batch", "4", "--precision", precision]  # fmt: skip
    res = subprocess.run(["bash", "bench/gpu.sh", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    log = (tmp_path / "gpu.log").read_text()
    for part in (f"pre-training, {precision}, ZeRO-2, metrics", "save on signal, then resume",
                 f"bench/step.py, {precision}"):  # fmt: skip
        assert f"## {part}: ok" in log, log
    assert 'cmal_mfu{job_id="local"' in log and "exit 75" in log and ", exact);" in log
    assert "engine/bare step-time ratio" in log and "aten::mm" in log
