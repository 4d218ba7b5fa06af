"""``cmal report RUNS...``: a study's fine-tuned runs as tables (mean ± std over seeds),
CMAL set against the contrastive baseline with a verdict, and a plot of each task's metric
against the pre-training data fraction (or, where every arm has all the pairs, per arm).

A run is grouped by its name, ``<study>-<arm>-s<seed>-<task>`` (what ``cmal/workflow/study.py``
names them); its numbers are its ``metrics.json``. A pre-training run ``<study>-<arm>-s<seed>``
evaluated zero-shot adds its ``zeroshot-<split>`` numbers to the zero-shot task's table.

Arm names say what is compared: ``[<world>-]<method>[-<variant>][-<pct>]``, method ``cmal``
or ``contrastive``, ``<pct>`` the percentage of the pre-training pairs (100 when absent),
``<world>`` a world prefix of a study on several worlds (``noisy-cmal-itc``). Every CMAL
arm is set against the contrastive arm of its world at its fraction and at 100%, and a
variant against the paper's CMAL of its world; the fraction plot draws the arms without a
variant.
On a study of several worlds, CMAL's lead over the contrastive model in the first world is
set against its lead in each other one.
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cmal.config import ConfigError
from cmal.tasks import TASKS, beside_accuracy, get_task, headline

NAME = re.compile(rf"^(?P<study>[^-]+)-(?P<arm>.+)-s(?P<seed>\d+)-(?P<task>{'|'.join(TASKS)})$")
PRETRAIN_NAME = re.compile(r"^(?P<study>[^-]+)-(?P<arm>.+)-s(?P<seed>\d+)$")
METHOD = re.compile(
    r"^(?P<world>(?:[a-z0-9]+-)*?)(?P<method>cmal|contrastive)"
    r"(?:-(?P<variant>[a-z][a-z0-9-]*?))?(?:-(?P<pct>\d+))?$"
)
ZERO_SHOT = "zeroshot-"
"""How a zero-shot evaluation labels its splits in the pre-training run's metrics.json."""
TASK_ORDER = TASKS


@dataclass
class Result:
    arm: str
    seed: int
    task: str
    metrics: dict[str, float]
    """split -> its headline metric in % (accuracy; retrieval's mean recall)."""
    more: dict[str, float] = field(default_factory=dict)
    """"<split> <metric>" -> each other metric the task reports, in % (NLVR2's
    consistency, REC's upper bound): in the tables, not in the verdicts or the plot."""


@functools.cache
def _zero_shot_task() -> str:
    """The task of a pre-training run's ``zeroshot-<split>`` labels: they do not name it,
    which holds while one task can be evaluated zero-shot (``Task.zero_shot``)."""
    (task,) = [t for t in TASKS if get_task(t).zero_shot]
    return task


def collect(paths: list[Path]) -> list[Result]:
    """Every evaluated run among ``paths`` (run folders; others are ignored)."""
    out = []
    for path in paths:
        m = NAME.match(path.name)
        zero_shot = m is None
        task = _zero_shot_task() if zero_shot else m["task"]
        m = m or PRETRAIN_NAME.match(path.name)
        metrics = path / "metrics.json"
        if not m or not metrics.is_file():
            continue
        try:
            data = json.loads(metrics.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{metrics}: not valid JSON ({e})") from None
        if zero_shot:
            data = {k: v for k, v in data.items() if k.startswith(ZERO_SHOT)}
            if not data:
                continue
        acc = {split: 100 * headline(v)[1] for split, v in data.items()}
        more = {f"{split} {k}": 100 * x for split, v in data.items()
                for k, x in beside_accuracy(v).items()}  # fmt: skip
        out.append(Result(m["arm"], int(m["seed"]), task, acc, more))
    if not out:
        raise ConfigError(
            "no evaluated runs named <study>-<arm>-s<seed>-<task> with a metrics.json among "
            f"{len(paths)} path(s)"
        )
    return out


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _values(
    results: list[Result], more: bool = False
) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(task, arm) -> split -> one value per seed (``more``: the other metrics too)."""
    by: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        for split, v in (r.metrics | r.more if more else r.metrics).items():
            by[(r.task, r.arm)][split].append(v)
    return by


def _seeds(values: dict[str, list[float]]) -> str:
    """The seeds column: one count, or the range where splits differ (a pre-training run's
    zero-shot columns beside fine-tuned ones: each has its own runs)."""
    counts = sorted({len(v) for v in values.values() if v})
    return "–".join(map(str, dict.fromkeys([counts[0], counts[-1]])))


def tables(results: list[Result]) -> str:
    """One Markdown table per task: arms × splits, mean ± std over seeds (n = seeds)."""
    by = _values(results, more=True)
    arms = list(dict.fromkeys(r.arm for r in results))
    lines = []
    for task in [t for t in TASK_ORDER if any(r.task == t for r in results)]:
        splits = list(dict.fromkeys(s for r in results if r.task == task
                                    for s in r.metrics | r.more))  # fmt: skip
        lines += [f"### {task}", "", "| arm | seeds | " + " | ".join(splits) + " |"]
        lines.append("|---|---|" + "---|" * len(splits))
        for arm in arms:
            if (task, arm) not in by:
                continue
            cells = [_cell(by[(task, arm)][s]) if by[(task, arm)][s] else "–" for s in splits]
            lines.append(f"| {arm} | {_seeds(by[(task, arm)])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


WIN_SE = 2.0
"""A gap counts (win or lose) when it exceeds this many standard errors of the difference
of the two means; at 3 seeds a rule of thumb, not a significance test."""


def _pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(CMAL arm, contrastive arm) pairs present, within each world: equal data
    (``cmal[-<variant>]-<p>`` against ``contrastive-<p>``), and for the less-data half of
    the claim ``cmal-<p>`` against the contrastive model at 100%."""
    contrastive = {}
    mine = []
    for arm in arms:
        m = METHOD.match(arm)
        if not m:
            continue
        pct = int(m["pct"] or 100)
        if m["method"] == "contrastive" and not m["variant"]:
            contrastive[(m["world"], pct)] = arm
        elif m["method"] == "cmal":
            mine.append((m["world"], pct, arm))
    out = []
    for world, pct, arm in sorted(mine, key=lambda x: -x[1]):
        for other in dict.fromkeys((pct, 100)):
            if (world, other) in contrastive:
                out.append((arm, contrastive[(world, other)]))
    return out


def _judge(diff: float, groups: list[list[float]], words=("win", "lose")) -> str:
    """``words[0]`` / ``words[1]`` when ``diff`` exceeds :data:`WIN_SE` standard errors
    sqrt(sum s²/n) of ``groups`` (the means it is made of), ``tie`` otherwise; ``1 seed``
    when a group has one value, as its spread is then unknown."""
    if min(map(len, groups)) < 2:
        return "1 seed"
    se = sum(statistics.variance(g) / len(g) for g in groups) ** 0.5
    if abs(diff) <= WIN_SE * se:
        return "tie"
    return words[0] if diff > 0 else words[1]


def verdict(a: list[float], b: list[float]) -> str:
    """``win`` / ``lose`` (for ``a``) when the difference of the means exceeds
    :data:`WIN_SE` standard errors sqrt(s_a²/n_a + s_b²/n_b), ``tie`` otherwise; ``1 seed``
    when either side has one value."""
    return _judge(statistics.mean(a) - statistics.mean(b), [a, b])


def _variant_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(CMAL variant, the paper's CMAL) pairs present: ``[<world>-]cmal-<variant>[-<p>]``
    against ``[<world>-]cmal[-<p>]``, what a variant costs or brings."""
    plain = {}
    variants = []
    for arm in arms:
        m = METHOD.match(arm)
        if m and m["method"] == "cmal":
            key = (m["world"], int(m["pct"] or 100))
            if m["variant"]:
                variants.append((key, arm))
            else:
                plain[key] = arm
    return [(arm, plain[key]) for key, arm in variants if key in plain]


def comparisons(results: list[Result], variants: bool = False) -> str:
    """CMAL against the contrastive baseline (``variants``: each CMAL variant against the
    paper's CMAL), per task and split: both means, the difference, and :func:`verdict`.
    Empty when the study has no such pair."""
    by = _values(results)
    lines = []
    arms = list(dict.fromkeys(r.arm for r in results))
    for a, b in (_variant_pairs if variants else _pairs)(arms):
        rows = []
        for task in TASK_ORDER:
            for split, va in by[(task, a)].items():
                vb = by[(task, b)].get(split)
                if not vb:
                    continue
                diff = statistics.mean(va) - statistics.mean(vb)
                rows.append(
                    f"| {task} | {split} | {_cell(va)} | {_cell(vb)} | {diff:+.1f} | "
                    f"{verdict(va, vb)} |"
                )
        if rows:
            lines += [f"### {a} vs {b}", "", f"| task | split | {a} | {b} | difference | verdict |"]
            lines += ["|---|---|---|---|---|---|", *rows, ""]
    return "\n".join(lines)


def across_worlds(results: list[Result]) -> str:
    """Size apart from noise: CMAL's lead over the contrastive model (plain arms, all the
    data) in the first world against each other world of the study, per task and split,
    and the change judged like a difference of two (by :func:`_judge`, over the four
    means' errors): ``grows`` / ``shrinks`` / ``tie``. Empty with fewer than two worlds."""
    by = _values(results)
    plain = {}
    for a, b in _pairs(list(dict.fromkeys(r.arm for r in results))):
        m = METHOD.match(a)
        if not m["variant"] and not m["pct"]:  # at 100%, paired with contrastive at 100%
            plain.setdefault(m["world"], (a, b))
    if len(plain) < 2:
        return ""
    # the world without a prefix (the study's first) is the one the others are read against
    (_, (a0, b0)), *others = sorted(plain.items())
    lines = []
    for _, (a1, b1) in others:
        rows = []
        for task in TASK_ORDER:
            for split, va0 in by[(task, a0)].items():
                groups = [va0, by[(task, b0)].get(split), by[(task, a1)].get(split),
                          by[(task, b1)].get(split)]  # fmt: skip
                if not all(groups):
                    continue
                lead0, lead1 = (statistics.mean(x) - statistics.mean(y)
                                for x, y in (groups[:2], groups[2:]))  # fmt: skip
                change = _judge(lead1 - lead0, groups, ("grows", "shrinks"))
                rows.append(f"| {task} | {split} | {lead0:+.1f} | {lead1:+.1f} | "
                            f"{lead1 - lead0:+.1f} | {change} |")  # fmt: skip
        if rows:
            head0, head1 = f"{a0} − {b0}", f"{a1} − {b1}"
            lines += [f"### {head0} against {head1}", "",
                      f"| task | split | {head0} | {head1} | change | verdict |",
                      "|---|---|---|---|---|---|", *rows, ""]  # fmt: skip
    return "\n".join(lines)


def markdown(results: list[Result]) -> str:
    """What ``cmal report`` prints: the tables, CMAL against the contrastive baseline, each
    CMAL variant against the paper's CMAL, and on a study of several worlds how CMAL's
    lead changes from one world to another."""
    text = tables(results)
    for head, section in [
        ("CMAL vs the contrastive baseline", comparisons(results)),
        ("CMAL's variants vs the paper's CMAL", comparisons(results, variants=True)),
        ("CMAL's lead from one world to another", across_worlds(results)),
    ]:
        if section:
            text += f"\n## {head}\n\n" + section
    return text


def _panels(results: list[Result]) -> dict[str, dict[str, list[float]]]:
    """Panel -> arm -> one value per seed, the mean of the run's splits; a task's
    zero-shot evaluation is a panel of its own (``<task> zero-shot``), in task order."""
    panels: dict = defaultdict(lambda: defaultdict(list))  # (task, zero-shot) -> arm -> values
    for r in results:
        if r.metrics:
            zero_shot = all(s.startswith(ZERO_SHOT) for s in r.metrics)
            panels[(r.task, zero_shot)][r.arm].append(statistics.mean(r.metrics.values()))
    return {
        f"{task} zero-shot" if zero_shot else task: panels[(task, zero_shot)]
        for task in TASK_ORDER
        for zero_shot in (False, True)
        if (task, zero_shot) in panels
    }


def plot(results: list[Result], out: Path) -> Path | None:
    """A study's figure: where arms differ in their share of the pre-training pairs, each
    task's mean accuracy (over its splits and seeds) against that share for CMAL and the
    contrastive baseline; where every arm has all the pairs (round 3), every arm side by
    side per task, zero-shot retrieval its own panel. Error bars: std over seeds. None when
    there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = {int(m["pct"] or 100) for r in results if (m := METHOD.match(r.arm))}
    draw = _draw_fractions if len(shares) > 1 else _draw_arms
    panels = draw(results)
    if not panels:
        return None
    cols = len(panels) if draw is _draw_fractions else min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, paint) in zip(axes.flat, panels.items(), strict=False):
        paint(ax)
        ax.set_title(title)
    for row in axes:
        row[0].set_ylabel("accuracy or mean recall (%),\nmean of splits")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _draw_fractions(results: list[Result]) -> dict:
    """Panel title -> a function drawing it: the arms without a variant, each method a
    line against the data fraction."""

    def paint(arms: dict[str, list[float]]):
        series: dict = defaultdict(dict)  # method -> pct -> values
        for arm, values in arms.items():
            m = METHOD.match(arm)
            if m and not m["variant"]:
                series[m["world"] + m["method"]][int(m["pct"] or 100)] = values

        def draw(ax) -> None:
            for method in sorted(series):
                xs = sorted(series[method])
                means, errs = zip(*(_mean_sd(series[method][x]) for x in xs), strict=True)
                style = "o-" if method.endswith("cmal") else "s--"
                ax.errorbar(xs, means, yerr=errs, fmt=style, capsize=3, label=method)
            ax.set_xlabel("pre-training pairs (%)")
            ax.legend()

        return draw if series else None

    drawn = {title: paint(arms) for title, arms in _panels(results).items()}
    return {title: draw for title, draw in drawn.items() if draw}


def _draw_arms(results: list[Result]) -> dict:
    """Panel title -> a function drawing it: one bar per arm (CMAL's arms in one colour,
    the contrastive ones in another, any other arm grey, a variant hatched)."""

    def paint(arms: dict[str, list[float]]):
        def draw(ax) -> None:
            for x, (arm, values) in enumerate(arms.items()):
                m = METHOD.match(arm)
                mean, sd = _mean_sd(values)
                ax.bar(x, mean, yerr=sd, capsize=3,
                       color={"cmal": "C0", "contrastive": "C1"}.get(m and m["method"], "C7"),
                       hatch="//" if m and m["variant"] else None)  # fmt: skip
            ax.set_xticks(range(len(arms)), list(arms), rotation=60, ha="right", fontsize=7)

        return draw

    def order(arm: str) -> tuple:  # each world's CMAL, its contrastive model, then variants
        m = METHOD.match(arm)
        return (m["world"], bool(m["variant"]), m["method"], arm) if m else ("~", arm)

    return {
        title: paint({arm: arms[arm] for arm in sorted(arms, key=order)})
        for title, arms in _panels(results).items()
    }
