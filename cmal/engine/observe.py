"""Prometheus metrics of a training run: loss per term, lr, grad-norm, step, samples/s,
tokens/s, MFU, data-wait share, peak memory, GPU utilisation and memory (NVML), restarts.

Every rank serves its own ``/metrics`` (``observe.port`` + local rank, on
``observe.host``), and may push to a Pushgateway (batch jobs end before a scrape comes)
under the grouping key run / stage / rank / job_id (``job`` is Prometheus's own label).
The numbers are the ones the loop writes to the run's JSONL log, set from the same
record, so a scrape and the log agree.

MFU = rows per second x analytic FLOPs per row (``CMAL.flops_per_sample`` at the padded
shapes) / (ranks x the device's peak). The peak comes from ``observe.peak_tflops`` or the
table below (dense bf16 tensor-core peaks); with neither (a CPU), MFU is not reported.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, start_http_server

from cmal.config import ConfigError, ObserveConfig

PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}
"""Dense bf16 (fp16 for V100/T4) tensor-core peaks, TFLOP/s, by a substring of the device
name; longer names are matched first ("L40S" before "L40" before "L4")."""

GAUGES = {
    "step": "Optimizer steps done.",
    "lr": "Learning rate of the first parameter group.",
    "grad_norm": "Global gradient norm of the last step.",
    "samples_per_s": "Training samples per second, all ranks together.",
    "tokens_per_s": "Text tokens + regions per second (not padding), all ranks together.",
    "mfu": "Model FLOPs utilisation: analytic FLOPs / (ranks x device peak).",
    "data_wait": "Share of step time spent waiting for the data loader.",
    "peak_memory_bytes": "Peak device memory (GPU) or peak resident memory (CPU) of the rank.",
    "restarts": "Earlier starts of this run (resumes after preemption or failure).",
}
RECORD_KEYS = ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "data_wait", "step")


def device_peak_tflops(cfg: ObserveConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def peak_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


class _Nvml:
    """GPU utilisation and memory of one device through NVML (nvidia-ml-py)."""

    def __init__(self, index: int):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> tuple[float, float]:
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0
        used = float(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        return util, used


class Observer:
    """The metrics of one rank: set from each log record, served and/or pushed."""

    def __init__(
        self,
        cfg: ObserveConfig,
        run: str,
        stage: str,
        rank: int,
        local_rank: int,
        device: torch.device,
        restarts: int,
        flops_per_row: float | None,
    ):
        self.cfg, self.device = cfg, device
        peak = device_peak_tflops(cfg, device)
        self.flops_per_row = flops_per_row
        self.peak_flops = peak * 1e12 if peak else None
        self.job = os.environ.get("SLURM_JOB_ID", "local")
        self.labels = {"run": run, "stage": stage, "rank": str(rank), "job_id": self.job}
        self.registry = CollectorRegistry()
        names = list(self.labels)
        self.gauges = {
            k: Gauge(f"cmal_{k}", doc, names, registry=self.registry) for k, doc in GAUGES.items()
        }
        self.loss = Gauge("cmal_loss", "Training loss per term.", [*names, "term"],
                          registry=self.registry)  # fmt: skip
        self.gpu_util = Gauge("cmal_gpu_utilization", "GPU utilisation (0-1), NVML.",
                              [*names, "device"], registry=self.registry)  # fmt: skip
        self.gpu_mem = Gauge("cmal_gpu_memory_used_bytes", "GPU memory in use, NVML.",
                             [*names, "device"], registry=self.registry)  # fmt: skip
        self.gauges["restarts"].labels(**self.labels).set(restarts)
        self.nvml = None
        if device.type == "cuda":
            try:
                self.nvml = _Nvml(device.index or 0)
            except Exception as e:  # no NVML library: the rest still works
                print(f"warning: no GPU utilisation metrics ({e})", file=sys.stderr)
        self.server = None
        self.targets_file: Path | None = None
        if cfg.port is not None:
            port = cfg.port + local_rank
            try:
                self.server, _ = start_http_server(port, addr=cfg.host, registry=self.registry)
            except OSError as e:
                raise ConfigError(
                    f"observe.port: cannot serve /metrics on {cfg.host}:{port} ({e})"
                ) from None
            self._write_target(port)
        self.last_push = 0.0

    def _write_target(self, port: int) -> None:
        """A file_sd entry for Prometheus (``observe.targets``), removed at close."""
        if not self.cfg.targets:
            return
        host = socket.gethostname() if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        folder = Path(self.cfg.targets)
        folder.mkdir(parents=True, exist_ok=True)
        self.targets_file = folder / f"{self.labels['run']}-{self.labels['rank']}.json"
        entry = [{"targets": [f"{host}:{port}"], "labels": self.labels}]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        tmp.replace(self.targets_file)

    def mfu(self, rows_per_s: float, ranks: int) -> float | None:
        """Model FLOPs utilisation of ``rows_per_s`` (all ranks), or None (no peak known)."""
        if not self.peak_flops or not self.flops_per_row:
            return None
        return rows_per_s * self.flops_per_row / (ranks * self.peak_flops)

    def observe(self, record: dict, losses: dict[str, float]) -> dict:
        """Set every gauge from a log record; returns the extra fields for the log (peak
        memory, GPU utilisation and memory)."""
        extra = {"peak_memory_bytes": peak_memory_bytes(self.device)}
        if self.nvml is not None:
            extra["gpu_utilization"], extra["gpu_memory_used_bytes"] = self.nvml.read()
            dev = {"device": str(self.device.index or 0)}
            self.gpu_util.labels(**self.labels, **dev).set(extra["gpu_utilization"])
            self.gpu_mem.labels(**self.labels, **dev).set(extra["gpu_memory_used_bytes"])
        self.gauges["peak_memory_bytes"].labels(**self.labels).set(extra["peak_memory_bytes"])
        for term, value in losses.items():
            self.loss.labels(**self.labels, term=term).set(value)
        for k in RECORD_KEYS:  # "step" last: a scrape that sees step N sees N's values
            if k in record:
                self.gauges[k].labels(**self.labels).set(record[k])
        if self.cfg.pushgateway and time.monotonic() - self.last_push >= self.cfg.push_every_s:
            self.push()
        return extra

    def push(self) -> None:
        if not self.cfg.pushgateway:
            return
        self.last_push = time.monotonic()
        try:
            push_to_gateway(
                self.cfg.pushgateway, job="cmal", registry=self.registry,
                grouping_key={k: v for k, v in self.labels.items()},
            )  # fmt: skip
        except OSError as e:  # a gateway down must not stop training
            print(f"warning: push to {self.cfg.pushgateway} failed: {e}", file=sys.stderr)

    def close(self) -> None:
        self.push()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.targets_file is not None:
            self.targets_file.unlink(missing_ok=True)


def count_starts(log_path: Path) -> int:
    """How many times the run was started before (``{"event": "start"}`` records)."""
    if not log_path.is_file():
        return 0
    return sum('"event": "start"' in line for line in log_path.read_text().splitlines())
