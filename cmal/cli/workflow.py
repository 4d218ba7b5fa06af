"""``cmal run``: a chain of stages, or a study, from a workflow file."""

from __future__ import annotations

from pathlib import Path

import typer

from cmal.cli.app import Overrides, app, user_errors
from cmal.config import ConfigError


@app.command("run")
@user_errors
def run_cmd(
    workflow: Path = typer.Argument(..., help="workflows/<chain>.yaml"),
    overrides: list[str] = Overrides,
    quick: bool = typer.Option(False, "--quick", help="A study's reduced variant."),
    arms: str | None = typer.Option(None, help="A study's arms to run (comma-separated)."),
    seeds: str | None = typer.Option(None, help="A study's seeds to run (comma-separated)."),
) -> None:
    """Run a chain of stages; done stages are skipped, interrupted ones resume."""
    from cmal.engine.loop import PREEMPTED_EXIT
    from cmal.workflow.runner import Runner, StageFailed, load_workflow

    try:
        picked = [a.strip() for a in arms.split(",")] if arms else None
        try:
            chosen = [int(x) for x in seeds.split(",")] if seeds else None
        except ValueError:
            raise ConfigError(f"--seeds: expected integers like 0,1, got {seeds!r}") from None
        wf = load_workflow(workflow, overrides or [], quick, picked, chosen)
        status = Runner(wf, echo=typer.echo).run()
    except StageFailed as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if status == "preempted":
        raise typer.Exit(PREEMPTED_EXIT)
