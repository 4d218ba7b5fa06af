"""``cmal config show`` and ``cmal model summary``: a resolved config, the model's size."""

from __future__ import annotations

import typer

from cmal.cli.app import ConfigOption, Overrides, config_app, model_app, resolve, user_errors


@config_app.command("show")
@user_errors
def config_show(config: str | None = ConfigOption, overrides: list[str] = Overrides) -> None:
    """Print the resolved config (defaults, file, overrides) as YAML."""
    resolve(config, overrides)


@model_app.command("summary")
@user_errors
def model_summary(
    config: str | None = ConfigOption,
    overrides: list[str] = Overrides,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the resolved config."),
) -> None:
    """Parameters per layer group and analytic FLOPs per sample of a pre-training step."""
    from cmal.model.pretrained import build_model
    from cmal.model.summary import summary_table

    cfg = resolve(config, overrides, show=not quiet)
    typer.echo(summary_table(build_model(cfg.model)))
