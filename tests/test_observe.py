"""Prometheus metrics with real parts on loopback: the trainer's /metrics agrees with its
JSONL log; a real Prometheus server (Debian's ``prometheus``) finds the trainer through a
file_sd entry and stores its loss series; a real Pushgateway receives a batch job's push."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from conftest import _free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_engine import finish, launch, write_config

from cmal.engine.loop import PREEMPTED_EXIT


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(
            f"{binary} is not installed: `just services` (run by `just test`) installs it "
            "(apt, as root)"
        )
    return path


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(metric name, sorted labels) -> value of an exposition text."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels) -> float:
    hits = [v for (n, ls), v in found.items() if n == name and labels.items() <= dict(ls).items()]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def log_rows(run) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_scrape_agrees_with_log_and_prometheus_stores_the_series(world, tmp_path):
    exe = need("prometheus")
    port, prom_port = _free_port(), _free_port()
    targets = tmp_path / "targets"
    cfg = write_config(
        tmp_path, world, name="obs", engine={"steps": 2000, "log_every": 5},
        observe={"port": port, "targets": str(targets)},
    )  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: cmal\n"
        f"    file_sd_configs: [{{files: ['{targets}/*.json'], refresh_interval: 1s}}]\n"
    )
    prom = subprocess.Popen(
        [exe, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs = launch(cfg, 1)
    try:
        # 1. A scrape of /metrics, taken when two scrapes in a row agree (no step between).
        url = f"http://127.0.0.1:{port}/metrics"

        def stable():
            a = samples(get(url))
            if not any(n == "cmal_step" for n, _ in a):
                return None
            time.sleep(0.05)
            return a if samples(get(url)) == a and value(a, "cmal_step") >= 10 else None

        scraped = wait_until(stable, 90, "a /metrics scrape at step >= 10", [*procs, prom], 0.2)
        # 2. Prometheus found the endpoint through the file_sd entry and stored the loss.
        api = f"http://127.0.0.1:{prom_port}/api/v1/query?"

        def series():
            q = urllib.parse.urlencode({"query": 'cmal_loss{term="loss",run="obs"}'})
            result = json.loads(get(api + q))["data"]["result"]
            return result or None

        result = wait_until(series, 90, "the loss series in Prometheus", [prom], 0.2)
        labels = result[0]["metric"]
        assert labels["stage"] == "pretrain" and labels["rank"] == "0"
        assert labels["job"] == "cmal" and labels["job_id"] == "local"
        assert float(result[0]["value"][1]) > 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGUSR2)
        codes = finish(procs)
        prom.terminate()
        prom.wait()
    assert codes == [PREEMPTED_EXIT]
    assert not list(targets.glob("*.json"))  # the file_sd entry goes with the endpoint

    step = int(value(scraped, "cmal_step"))
    row = log_rows(tmp_path / "runs/obs")[step]
    for term in ("loss", "amc", "mlm", "itm"):
        assert value(scraped, "cmal_loss", term=term) == row[term]
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait"):
        assert value(scraped, f"cmal_{key}") == row[key], key
    assert value(scraped, "cmal_peak_memory_bytes") == row["peak_memory_bytes"] > 0
    assert row["tokens_per_s"] > row["samples_per_s"] > 0
    assert row["grad_norm"] > 0  # ZeRO-0 keeps none: the loop takes it before the step
    assert "mfu" not in row  # a CPU: no peak, so no made-up MFU
    assert value(scraped, "cmal_restarts") == 0


def test_batch_job_pushes_to_a_real_pushgateway_and_counts_restarts(world, tmp_path):
    exe = need("prometheus-pushgateway")
    port = _free_port()
    gw = subprocess.Popen(
        [exe, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(
            lambda: get(f"http://127.0.0.1:{port}/-/ready"), 90, "the Pushgateway", [gw], 0.2
        )
        cfg = write_config(
            tmp_path, world, name="push", engine={"steps": 6},
            observe={"pushgateway": f"http://127.0.0.1:{port}", "peak_tflops": 0.5},
        )  # fmt: skip
        assert finish(launch(cfg, 1)) == [0]
        first = samples(get(f"http://127.0.0.1:{port}/metrics"))
        cfg = write_config(
            tmp_path, world, name="push", engine={"steps": 9},
            observe={"pushgateway": f"http://127.0.0.1:{port}", "peak_tflops": 0.5},
        )  # fmt: skip
        assert finish(launch(cfg, 1, "--force")) == [0]  # steps changed: resumed at 6
        second = samples(get(f"http://127.0.0.1:{port}/metrics"))
    finally:
        gw.terminate()
        gw.wait()
    key = {"job": "cmal", "run": "push", "stage": "pretrain", "rank": "0", "job_id": "local"}
    assert value(first, "cmal_step", **key) == 6
    assert value(first, "cmal_restarts", **key) == 0
    assert value(second, "cmal_step", **key) == 9
    assert value(second, "cmal_restarts", **key) == 1
    rows = log_rows(tmp_path / "runs/push")
    # MFU from the configured peak: rows/s x FLOPs per row / peak, as the log has it.
    assert value(second, "cmal_mfu", **key) == rows[9]["mfu"] > 0


def test_shipped_prometheus_config_and_dashboard_use_real_metrics(tmp_path):
    import re

    import torch
    from conftest import ROOT

    from cmal.config import ObserveConfig
    from cmal.engine.observe import Observer

    res = subprocess.run(
        [need("promtool"), "check", "config", str(ROOT / "cluster/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    obs = Observer(ObserveConfig(), "r", "pretrain", 0, 0, torch.device("cpu"), 0, None)
    names = {m.name for m in obs.registry.collect()}
    dashboard = json.loads((ROOT / "cluster/grafana/cmal-training.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bcmal_[a-z_]+", target["expr"])
    }
    assert used and used <= names, used - names
