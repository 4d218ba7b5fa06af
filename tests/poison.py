"""`cmal ...` with one batch made to give a NaN loss (a test's fault): the batch of the
POISON_DRAW-th forward pass of each rank, and any later batch holding its first sample.
Each forward pass of a batch holding that sample prints "poisoned <id>" to stdout.

    python tests/poison.py pretrain -c run.yaml          # POISON_DRAW=4 by default
"""

from __future__ import annotations

import os
import sys

from cmal.cli import main
from cmal.workflow.pretrain import PretrainObjective

calls, poisoned = 0, []
forward = PretrainObjective.forward


def poisoned_forward(self, item):
    global calls
    calls += 1
    if calls == int(os.environ.get("POISON_DRAW", "4")):
        poisoned.append(item["ids"][0])
    losses = forward(self, item)
    if poisoned and poisoned[0] in item["ids"]:
        print(f"poisoned {poisoned[0]}", flush=True)
        losses = {k: v * float("nan") for k, v in losses.items()}
    return losses


PretrainObjective.forward = poisoned_forward

if __name__ == "__main__":
    sys.exit(main())
