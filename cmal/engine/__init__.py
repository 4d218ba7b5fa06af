"""The engine: DeepSpeed set-up, the training loop (any module that returns a loss), atomic
checkpoints with a ``latest`` pointer written last, run folders on a local disk or an
object store, host-read accounting, and the run's metrics for Prometheus.

Imports ``config``, ``errors`` and the data's error type; no model, no task: what it trains
is handed to it.
"""
