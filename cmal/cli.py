"""The ``cmal`` command line. Thin: parse, load the config, call the library.

cmal config show --config configs/model/tiny.yaml model.unified.layers=2
cmal model summary --config configs/model/base.yaml
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from cmal.config import Config, ConfigError, load_config, to_yaml

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configurations.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect the model.")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (may name a 'base').")
Overrides = typer.Argument(None, help="Dotted overrides, e.g. model.unified.layers=2")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors meant for users into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def resolve(config: str | None, overrides: list[str] | None, show: bool = True) -> Config:
    """Load and validate the config; print it resolved (as every command does at start)."""
    cfg = load_config(config, overrides or [])
    if show:
        typer.echo(f"# resolved config ({config or 'defaults'})")
        typer.echo(to_yaml(cfg))
    return cfg


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
    from cmal.model.summary import summary_table
    from cmal.pretrained import build_model

    cfg = resolve(config, overrides, show=not quiet)
    typer.echo(summary_table(build_model(cfg.model)))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="cmal")


if __name__ == "__main__":
    sys.exit(main())
