"""Parameter counts per layer group and FLOPs per sample: what ``cmal model summary`` prints."""

from __future__ import annotations

from torch import nn

from cmal.model.cmal import CMAL

GROUPS = {
    "text embeddings": ("text.word", "text.position", "text.segment", "text.ln"),
    "text encoder": ("text.encoder",),
    "visual input": (
        "visual.feature",
        "visual.feature_ln",
        "visual.geometry",
        "visual.geometry_ln",
        "visual.ln",
    ),
    "visual encoder": ("visual.encoder",),
    "hypersphere heads": ("text_sphere", "region_sphere"),
    "associative prompt": ("prompt",),
    "unified embeddings": (
        "unified.text_position",
        "unified.region_position",
        "unified.modality",
        "unified.ln",
    ),
    "unified encoder": ("unified.encoder",),
    "AMC head": ("amc",),
    "MLM head": ("mlm",),
    "ITM head": ("itm",),
    "ITC head": ("itc",),
}
"""Layer group -> parameter-name prefixes; every parameter falls in exactly one group."""


def parameter_groups(model: nn.Module) -> dict[str, int]:
    """Number of parameters per group of :data:`GROUPS` (groups with none are left out)."""
    counts = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        group = next(
            (
                g
                for g, prefixes in GROUPS.items()
                if any(name.startswith(x + ".") for x in prefixes)
            ),
            None,
        )
        if group is None:
            raise KeyError(f"parameter {name} is in no summary group; add it to GROUPS")
        counts[group] += p.numel()
    return {g: n for g, n in counts.items() if n}


def _si(x: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def summary_table(model: CMAL) -> str:
    """A plain-text table of parameters per group, then FLOPs per sample."""
    groups = parameter_groups(model)
    total = sum(groups.values())
    width = max(len(g) for g in groups) + 2
    lines = [f"{'layer group':<{width}}{'parameters':>14}{'share':>8}"]
    for g, n in groups.items():
        lines.append(f"{g:<{width}}{n:>14,}{100 * n / total:>7.1f}%")
    lines.append(f"{'total':<{width}}{total:>14,}")
    cfg = model.cfg
    fwd = model.flops_per_sample(train=False)
    step = model.flops_per_sample(train=True)
    lines += [
        "",
        f"FLOPs per sample (analytic, text {cfg.max_text_len} tokens, {cfg.max_regions} regions,"
        f" MLM on {cfg.losses.mlm_prob:.0%} of the text):",
        f"  forward                  {_si(fwd)}FLOP",
        f"  pre-training step (f+b)  {_si(step)}FLOP",
    ]
    return "\n".join(lines)
