"""The ``cmal`` command line, one module per command group, each command thin: it parses,
loads the config, calls the library and prints the result:

- ``inspect``: ``config show``, ``model summary``
- ``data``: ``data world|convert|coverage``, ``extract``
- ``train``: ``pretrain``, ``finetune``, ``evaluate``, ``export`` on this machine
- ``workflow``: ``run`` (a chain of stages or a study)
- ``cluster``: ``submit …``, ``status``, ``cancel``
- ``analysis``: ``report``, ``visualize``

It may import every layer below it; nothing imports it.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from cmal.cli.app import app

# isort: off
# Each group registers its commands on import, in the order `cmal --help` lists them.
from cmal.cli import data, train, workflow, cluster, analysis, inspect  # noqa: F401
# isort: on


def _click_error(name: str) -> type[Exception]:
    """A click exception class, from the click that typer uses (its own or PyPI's)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


def run(argv: list[str] | None = None) -> int:
    """Run one command line; returns its exit status. A usage error (a missing option, a
    value of the wrong type) is one line on stderr, as every other user error is."""
    usage, click_error = _click_error("UsageError"), _click_error("ClickException")
    try:
        code = app(args=argv, prog_name="cmal", standalone_mode=False)
    except usage as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # `cmal data`: its help, as asked
            typer.echo(e.format_message())
            return 0
        where = ctx.command_path if ctx is not None else "cmal"
        typer.echo(f"error: {e.format_message()} (see: {where} --help)", err=True)
        code = e.exit_code
    except click_error as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        code = e.exit_code
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 130
    return 0 if code is None else int(code)


def main() -> None:
    """Console-script entry point."""
    try:
        code = run()
    except SystemExit as done:
        close_world(done.code)
        raise
    close_world(code)
    sys.exit(code)


def close_world(code: Any) -> None:
    """End the process group before the interpreter does, when every rank ends together
    (done or preempted): left to the interpreter's exit, a rank sometimes aborted there
    ("terminate called without an active exception", exit 134) with its work done."""
    if "torch.distributed" not in sys.modules:
        return  # this command started no process group
    import torch.distributed as dist

    from cmal.engine.loop import PREEMPTED_EXIT

    # No barrier first: a rank that failed after the last collective would hold the others
    # in it until the group's timeout. Destroying is local; every collective is done here.
    if code in (0, None, PREEMPTED_EXIT) and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
