"""The ``cmal`` command line's shared parts: the app and its command groups, the options
several commands take, and the error handling every command has."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from cmal.config import Config, ConfigError, load_config, to_yaml
from cmal.data.errors import DataError
from cmal.errors import RunError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="The cmal command line. Thin: parse, load the config, call the library.",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configurations.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect the model.")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
data_app = typer.Typer(no_args_is_help=True, help="Make and convert data sets into shards.")
app.add_typer(data_app, name="data")

submit_app = typer.Typer(
    no_args_is_help=True, help="Submit a stage or a workflow as a job (SLURM or local)."
)
app.add_typer(submit_app, name="submit")


ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (may name a 'base').")
Overrides = typer.Argument(None, help="Dotted overrides, e.g. model.unified.layers=2")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors meant for users into one line on stderr and exit code 2 (bad config
    or data) or 4 (a run stopped: a full disk, a run folder in use)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except RunError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def resolve(config: str | None, overrides: list[str] | None, show: bool = True) -> Config:
    """Load and validate the config; print it resolved (as every command does at start)."""
    cfg = load_config(config, overrides or [])
    if show:
        typer.echo(f"# resolved config ({config or 'defaults'})")
        typer.echo(to_yaml(cfg))
    return cfg
