"""``cmal report`` and ``cmal visualize``: a study's tables, plots and figures."""

from __future__ import annotations

from pathlib import Path

import typer

from cmal.cli.app import app, user_errors


@app.command("report")
@user_errors
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders (e.g. runs/claim-*)."),
    out: Path | None = typer.Option(None, help="Also write the tables to this Markdown file."),
    plot: Path | None = typer.Option(
        None,
        help="PNG: each task's metric vs the pre-training data fraction; where every arm "
        "has all the pairs, every arm side by side.",
    ),
) -> None:
    """A study's results: per task, arms x splits, mean ± std over seeds; CMAL against
    the contrastive baseline (win / tie / lose beyond two standard errors)."""
    from cmal.analysis.report import collect, markdown
    from cmal.analysis.report import plot as draw

    results = collect(runs)
    text = markdown(results)
    typer.echo(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if plot:
        made = draw(results, plot)
        typer.echo(f"wrote {made}" if made else "nothing to plot")


@app.command("visualize")
@user_errors
def visualize_cmd(
    runs: list[Path] = typer.Argument(
        ..., help="Pre-training run folders (e.g. CMAL, contrastive)."
    ),
    out: Path = typer.Option(Path("docs/figures"), help="Folder for the PNG files."),
    shards: str | None = typer.Option(None, help="Captions to use (default: each run's val set)."),
    n: int = typer.Option(256, min=8, help="Captions per run for t-SNE and the AMC matrix."),
) -> None:
    """t-SNE at anchors, anchor-to-region attention, AMC confusion matrix (PNG)."""
    from cmal.analysis.visualize import visualize

    for path in visualize(runs, out, shards, n):
        typer.echo(f"wrote {path}")
