"""One stage on this machine: ``cmal pretrain``, ``finetune``, ``evaluate``, ``export``."""

from __future__ import annotations

from pathlib import Path

import typer

from cmal.cli.app import ConfigOption, Overrides, app, user_errors
from cmal.config import ConfigError, load_config


@app.command("pretrain")
@user_errors
def pretrain_cmd(
    config: str | None = ConfigOption,
    overrides: list[str] = Overrides,
    force: bool = typer.Option(
        False, help="Load the newest checkpoint even if its config differs."
    ),
) -> None:
    """Pre-train CMAL (resumes the run's newest checkpoint by itself)."""
    from cmal.engine.loop import PREEMPTED_EXIT, NonFiniteLoss
    from cmal.workflow.pretrain import pretrain

    cfg = load_config(config, overrides or [])
    try:
        outcome = pretrain(cfg, force=force)
    except NonFiniteLoss as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    typer.echo(
        f"{outcome.status} at step {outcome.step}: "
        + " ".join(f"{k}={v:.4f}" for k, v in outcome.losses.items())
    )
    if outcome.status == "preempted":
        raise typer.Exit(PREEMPTED_EXIT)


@app.command("finetune")
@user_errors
def finetune_cmd(
    task: str = typer.Option(..., help="vqa, ve, nlvr2, rec or retrieval"),
    source: str | None = typer.Option(
        None, "--from", help="Pre-training run folder, checkpoint folder or .safetensors."
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="Default: configs/finetune/<task>.yaml"
    ),
    overrides: list[str] = Overrides,
    force: bool = typer.Option(
        False, help="Load the newest checkpoint even if its config differs."
    ),
) -> None:
    """Fine-tune on a downstream task, then evaluate it (resumes by itself)."""
    from cmal.engine.loop import PREEMPTED_EXIT
    from cmal.workflow.finetune import finetune, finetune_config, metrics_table

    cfg = finetune_config(task, source, config, overrides or [])
    outcome, metrics = finetune(cfg, force=force)
    typer.echo(f"{outcome.status} at step {outcome.step}")
    if metrics:
        typer.echo(metrics_table(task, metrics))
    if outcome.status == "preempted":
        raise typer.Exit(PREEMPTED_EXIT)


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    task: str = typer.Option(..., help="vqa, ve, nlvr2, rec or retrieval"),
    run: str | None = typer.Option(
        None,
        help="Fine-tuned run folder (or s3:// run) to evaluate; for retrieval also a "
        "pre-training run (zero-shot).",
    ),
    data_root: str | None = typer.Option(
        None, help="Read the eval sets from this shard root instead of the run's task.data_root."
    ),
    split: list[str] = typer.Option([], help="Split(s); default: the task's evaluation splits."),
    predictions: Path | None = typer.Option(None, help="Score this prediction file instead."),
    questions: Path | None = typer.Option(None, help="vqa: official questions json"),
    annotations: Path | None = typer.Option(None, help="vqa: official annotations json"),
    jsonl: Path | None = typer.Option(None, help="ve: snli_ve_<split>.jsonl"),
    statements: Path | None = typer.Option(None, "--json", help="nlvr2: <split>.json"),
    refs: Path | None = typer.Option(None, help="rec: refs(unc).p"),
    instances: Path | None = typer.Option(None, help="rec: instances.json"),
    captions: Path | None = typer.Option(
        None, help="retrieval: Karpathy's dataset_<name>.json (--split val or test)"
    ),
) -> None:
    """Evaluate a fine-tuned run, or score a prediction file against official annotations."""
    import json

    from cmal.workflow.finetune import evaluate, metrics_table, score_predictions

    if predictions is not None:
        files = {
            k: v
            for k, v in {
                "questions": questions,
                "annotations": annotations,
                "jsonl": jsonl,
                "json": statements,
                "refs": refs,
                "instances": instances,
                "captions": captions,
            }.items()
            if v
        }
        if len(split) > 1:
            raise ConfigError("--predictions scores one split at a time")
        result = score_predictions(task, predictions, files, split[0] if split else None)
        typer.echo(json.dumps(result, indent=1))
        return
    if run is None:
        raise ConfigError("evaluate needs --run RUN (or --predictions FILE with annotation files)")
    metrics = evaluate(run, task, split or None, quiet=True, data_root=data_root)
    typer.echo(metrics_table(task, metrics))


@app.command("export")
@user_errors
def export_cmd(
    run: str = typer.Argument(..., help="Run folder (runs/<name> or s3://bucket/runs/<name>)."),
    to: str = typer.Option("fp32", help="Only fp32: consolidated safetensors."),
    out: Path | None = typer.Option(
        None, help="Output file (default RUN/model.fp32.safetensors; for an s3:// run, its mirror)."
    ),
) -> None:
    """Write the run's newest checkpoint as consolidated fp32 safetensors (no DeepSpeed needed)."""
    from cmal.engine.store import local_run
    from cmal.workflow.pretrain import export_fp32

    if to != "fp32":
        raise ConfigError(f"--to {to!r}: only fp32 is supported")
    out = out or local_run(run) / "model.fp32.safetensors"
    typer.echo(f"wrote {export_fp32(run, out)}")
