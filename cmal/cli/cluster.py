"""``cmal submit …``, ``cmal status``, ``cmal cancel``: stages and workflows as cluster
jobs (SLURM through submitit, or local processes)."""

from __future__ import annotations

from pathlib import Path

import typer

from cmal.cli.app import ConfigOption, Overrides, app, submit_app, user_errors
from cmal.cli.data import DetectorOption, DetectSettings, FeaturesOutOption, ImagesOption
from cmal.config import load_config, to_yaml
from cmal.data.errors import DataError

NodesOption = typer.Option(None, "--nodes", help="Nodes (default: the profile's).")
GpusOption = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: the profile's).")
ClusterOption = typer.Option(
    None, "--cluster", help="Profile: cluster/<name>.yaml or a path (default: slurm if "
    "sbatch is installed, else local)."
)  # fmt: skip
DryRunOption = typer.Option(False, "--dry-run", help="Print the job script and config only.")


def _submit(spec, cluster, nodes, gpus, dry_run: bool, shown: str) -> None:
    from cmal.launch.jobs import submit

    code = submit(spec, cluster, nodes, gpus, dry_run, shown, echo=typer.echo)
    if code:
        raise typer.Exit(code)


@submit_app.command("pretrain")
@user_errors
def submit_pretrain(
    config: str | None = ConfigOption,
    overrides: list[str] = Overrides,
    nodes: int | None = NodesOption,
    gpus_per_node: int | None = GpusOption,
    cluster: str | None = ClusterOption,
    dry_run: bool = DryRunOption,
) -> None:
    """Pre-train as a job; it requeues itself on preemption/timeout and resumes."""
    from cmal.launch.jobs import JobSpec

    cfg = load_config(config, overrides or [])
    spec = JobSpec("pretrain", cfg.name, config, list(overrides or []))
    _submit(spec, cluster, nodes, gpus_per_node, dry_run, "# resolved config\n" + to_yaml(cfg))


@submit_app.command("finetune")
@user_errors
def submit_finetune(
    task: str = typer.Option(..., help="vqa, ve, nlvr2, rec or retrieval"),
    source: str | None = typer.Option(None, "--from", help="Pre-training run or weights."),
    config: str | None = ConfigOption,
    overrides: list[str] = Overrides,
    nodes: int | None = NodesOption,
    gpus_per_node: int | None = GpusOption,
    cluster: str | None = ClusterOption,
    dry_run: bool = DryRunOption,
) -> None:
    """Fine-tune (then evaluate) as a job."""
    from cmal.launch.jobs import JobSpec
    from cmal.workflow.finetune import finetune_config

    cfg = finetune_config(task, source, config, overrides or [])
    spec = JobSpec("finetune", cfg.name, config, list(overrides or []), task, source)
    _submit(spec, cluster, nodes, gpus_per_node, dry_run, "# resolved config\n" + to_yaml(cfg))


@submit_app.command("extract")
@user_errors
def submit_extract(
    images: str = ImagesOption,
    out: Path = FeaturesOutOption,
    detector: str = DetectorOption,
    settings: list[str] = DetectSettings,
    nodes: int | None = NodesOption,
    gpus_per_node: int | None = GpusOption,
    cluster: str | None = ClusterOption,
    dry_run: bool = DryRunOption,
) -> None:
    """Extract region features as a job: its ranks split the images; a requeued job skips
    the images already done."""
    from cmal.detect.base import detect_config
    from cmal.launch.jobs import JobSpec

    cfg = detect_config(detector, settings or [])
    name = f"extract-{Path(out).name}"
    spec = JobSpec("extract", name, overrides=list(settings or []), detector=detector,
                   images=images, out=str(Path(out).resolve()))  # fmt: skip
    _submit(spec, cluster, nodes, gpus_per_node, dry_run, f"# detector settings\n{cfg}")


@submit_app.command(
    "convert", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
@user_errors
def submit_convert(
    ctx: typer.Context,
    fmt: str = typer.Argument(..., metavar="FORMAT", help="As for `cmal data convert`."),
    parts: int = typer.Option(2, min=1, help="Array tasks, each a slice of the images."),
    cluster: str | None = ClusterOption,
    dry_run: bool = DryRunOption,
) -> None:
    """Convert a public data set as a SLURM job array: task K writes the K-th of --parts
    slices of the images (a requeued or rerun task redoes only its own, if not done), the
    last to finish merges them into --out. Every other option is `cmal data convert`'s."""
    from cmal.launch.jobs import JobSpec

    args = [fmt, *ctx.args]
    out = _checked_convert_args(args)
    spec = JobSpec("convert", f"convert-{out.name}", overrides=args, parts=parts)
    _submit(spec, cluster, None, None, dry_run, f"# cmal data convert {' '.join(args)}")


def _checked_convert_args(args: list[str]) -> Path:
    """Parse ``cmal data convert``'s arguments as that command would, so that a typo is
    refused here, before anything is submitted; returns --out."""
    import click

    from cmal.cli.app import data_app

    command = typer.main.get_command(data_app).commands["convert"]  # type: ignore[attr-defined]
    try:
        ctx = command.make_context("cmal data convert", list(args), resilient_parsing=False)
    except click.ClickException as e:
        raise DataError(f"cmal submit convert: {e.format_message()}") from None
    if ctx.params.get("part") is not None:
        raise DataError("cmal submit convert: --parts sets the slices; do not pass --part")
    return Path(ctx.params["out"])


@submit_app.command("run")
@user_errors
def submit_run(
    workflow: str = typer.Argument(..., help="workflows/<chain>.yaml"),
    overrides: list[str] = Overrides,
    nodes: int | None = NodesOption,
    gpus_per_node: int | None = GpusOption,
    cluster: str | None = ClusterOption,
    dry_run: bool = DryRunOption,
) -> None:
    """Run a whole workflow as one job (done stages skip, an interrupted one resumes)."""
    from cmal.launch.jobs import JobSpec
    from cmal.workflow.runner import load_workflow

    wf = load_workflow(workflow, overrides or [])
    spec = JobSpec("run", wf.name, None, list(overrides or []), workflow=workflow)
    stages = "\n".join(f"#   {st['name']} ({st['kind']})" for st in wf.stages)
    _submit(spec, cluster, nodes, gpus_per_node, dry_run, f"# workflow {wf.name}\n{stages}")


@app.command("status")
@user_errors
def status_cmd(
    run: str = typer.Argument(..., help="Run name (or runs/<name>)."),
    cluster: str | None = ClusterOption,
) -> None:
    """The run's jobs: state, requeues, nodes, and the error of a failed one."""
    from cmal.launch import jobs as launch

    _, prof = launch.load(cluster)
    rows = launch.job_status(prof, Path(run).name)
    typer.echo(f"{'job':<10}{'kind':<10}{'state':<14}{'requeues':>9}  nodes")
    for j in rows:
        restarts = "?" if j["restarts"] < 0 else str(j["restarts"])
        typer.echo(f"{j['job_id']:<10}{j['kind']:<10}{j['state']:<14}{restarts:>9}  {j['nodes']}")
        if j["error"]:
            typer.echo(f"  error: {j['error']}")


@app.command("cancel")
@user_errors
def cancel_cmd(
    run: str = typer.Argument(..., help="Run name (or runs/<name>)."),
    cluster: str | None = ClusterOption,
) -> None:
    """Cancel the run's jobs that have not ended."""
    from cmal.launch import jobs as launch

    _, prof = launch.load(cluster)
    gone = launch.cancel(prof, Path(run).name)
    typer.echo(
        f"cancelled: {' '.join(gone)}" if gone else "no job of this run is queued or running"
    )
