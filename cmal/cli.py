"""The ``cmal`` command line. Thin: parse, load the config, call the library.

cmal config show --config configs/model/tiny.yaml model.unified.layers=2
cmal model summary --config configs/model/base.yaml
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from cmal.config import Config, ConfigError, load_config, to_yaml
from cmal.data.convert.readers import FORMATS
from cmal.data.errors import DataError
from cmal.errors import RunError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__
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
    from cmal.stages import pretrain

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
    task: str = typer.Option(..., help="vqa, ve, nlvr2 or rec"),
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
    from cmal.downstream import finetune, finetune_config, metrics_table
    from cmal.engine.loop import PREEMPTED_EXIT

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
    task: str = typer.Option(..., help="vqa, ve, nlvr2 or rec"),
    run: str | None = typer.Option(None, help="Fine-tuned run folder (or s3:// run) to evaluate."),
    split: list[str] = typer.Option([], help="Split(s); default: the task's evaluation splits."),
    predictions: Path | None = typer.Option(None, help="Score this prediction file instead."),
    questions: Path | None = typer.Option(None, help="vqa: official questions json"),
    annotations: Path | None = typer.Option(None, help="vqa: official annotations json"),
    jsonl: Path | None = typer.Option(None, help="ve: snli_ve_<split>.jsonl"),
    statements: Path | None = typer.Option(None, "--json", help="nlvr2: <split>.json"),
    refs: Path | None = typer.Option(None, help="rec: refs(unc).p"),
    instances: Path | None = typer.Option(None, help="rec: instances.json"),
) -> None:
    """Evaluate a fine-tuned run, or score a prediction file against official annotations."""
    import json

    from cmal.downstream import evaluate, metrics_table, score_predictions

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
    metrics = evaluate(run, task, split or None, quiet=True)
    typer.echo(metrics_table(task, metrics))


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
    from cmal.workflow import Runner, StageFailed, load_workflow

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
    from cmal.stages import export_fp32

    if to != "fp32":
        raise ConfigError(f"--to {to!r}: only fp32 is supported")
    out = out or local_run(run) / "model.fp32.safetensors"
    typer.echo(f"wrote {export_fp32(run, out)}")


@data_app.command("world")
@user_errors
def data_world(
    out: Path = typer.Option(..., help="Folder to write the world into."),
    images: int = typer.Option(2000, min=40, help="Number of scene images (at least 40)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files."),
    feature_dim: int = typer.Option(128, min=8, help="Size of a region feature vector."),
    workers: int = typer.Option(2, min=1, help="Rendering processes."),
    shards: bool = typer.Option(True, help="Also convert everything into shards under OUT/shards."),
    attribute_tags: bool = typer.Option(
        True, help="Tag regions '<colour> <shape>' (48 anchor concepts) instead of the shape."
    ),
) -> None:
    """Render the scene world in the public formats (COCO, VQA v2, SNLI-VE, NLVR2, RefCOCO+)."""
    from cmal.data.world import WorldConfig, generate

    counts = generate(
        out, WorldConfig(images=images, seed=seed, feature_dim=feature_dim, workers=workers)
    )
    typer.echo(" ".join(f"{k}={v}" for k, v in counts.items()))
    if shards:
        from cmal.data.convert.world import convert_world
        from cmal.pretrained import load_tokenizer

        tokenizer = load_tokenizer()
        converted = convert_world(out, out / "shards", tokenizer, attribute_tags=attribute_tags)
        for name, done in converted.items():
            typer.echo(f"shards {name:<16} {done.samples:>7} samples {done.anchors:>7} anchors")


@data_app.command("convert")
@user_errors
def data_convert(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="One of: " + ", ".join(FORMATS)),
    features: str = typer.Option(
        ..., help="Region features: folder of npz, or BUTD/LXMERT/VinVL tsv."
    ),
    out: Path = typer.Option(..., help="Shard folder to write (must be new or empty)."),
    classes: Path | None = typer.Option(
        None, help="Detector class list, one per line (objects_vocab.txt)."
    ),
    attributes: Path | None = typer.Option(
        None,
        help="Attribute list (one per line): tags become '<attribute> <class>' from "
        "attrs_id (LXMERT tsv, npz).",
    ),
    synonyms: str = typer.Option(
        "default", help="Synonym table: default, none, or a JSON file merged over the default."
    ),
    stoplist: str = typer.Option(
        "default", help="Classes that are no concept: default, none, or a file (one per line)."
    ),
    labels: Path | None = typer.Option(
        None, help="VinVL: the label tsv of a feature tsv (default: found beside it)."
    ),
    hw: Path | None = typer.Option(None, help="VinVL: the hw tsv (default: found beside it)."),
    captions: Path | None = typer.Option(
        None, help="coco-captions: captions_<split>.json; karpathy: dataset_<name>.json"
    ),
    splits: str = typer.Option(
        "train,restval", help="karpathy: the splits to convert (train, restval, val, test)."
    ),
    regions: Path | None = typer.Option(None, help="vg: region_descriptions.json"),
    questions: Path | None = typer.Option(None, help="vqa: questions json"),
    annotations: Path | None = typer.Option(None, help="vqa: annotations json (not for test-dev)"),
    jsonl: Path | None = typer.Option(None, help="snli-ve: snli_ve_<split>.jsonl"),
    statements: Path | None = typer.Option(None, "--json", help="nlvr2: <split>.json"),
    refs: Path | None = typer.Option(None, help="refcoco: refs(unc).p"),
    instances: Path | None = typer.Option(None, help="refcoco: instances.json"),
    split: str | None = typer.Option(None, help="refcoco: train, val, testA or testB"),
    max_text_len: int = typer.Option(40, help="Wordpieces kept per text."),
    max_regions: int = typer.Option(36, help="Regions kept per image (highest confidence)."),
    on_bad_sample: str = typer.Option("error", help="error or skip (and count)"),
) -> None:
    """Write MDS shards from a public annotation format joined with region features, and
    report the anchor coverage (also in OUT/anchor_stats.json)."""
    from cmal.data.convert import (
        SampleBuilder,
        check_out,
        read_aliases,
        read_classes,
        write_shards,
    )
    from cmal.data.convert.readers import annotation_records
    from cmal.data.coverage import report
    from cmal.data.features import FeatureSource
    from cmal.data.vocab import make_vocab
    from cmal.pretrained import load_tokenizer

    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"--on-bad-sample must be error or skip, got {on_bad_sample!r}")
    check_out(out)
    task, records = annotation_records(
        fmt,
        captions=captions, splits=splits,
        regions=regions, questions=questions, annotations=annotations, jsonl=jsonl,
        statements=statements, refs=refs, instances=instances, split=split,
    )  # fmt: skip
    names = read_classes(classes)
    attrs = read_classes(attributes)
    if attrs is not None and names is None:
        raise DataError("--attributes needs --classes (attribute tags name a class too)")
    source = FeatureSource(features, names, attrs, labels, hw)
    hint = source.tag_source()
    if hint:
        typer.echo(f"warning: {hint}; without classes no sample has an anchor", err=True)
    if names is None:
        found = sorted({t for k in source.keys() for t in source[k].tags} - {""})
        vocab = make_vocab(found, None, None, synonyms, stoplist)
    else:
        vocab = make_vocab(names, attrs, read_aliases(classes), synonyms, stoplist)
    if len(vocab) == 0:
        typer.echo(
            "warning: the anchor vocabulary is empty: no sample can have an anchor", err=True
        )
    builder = SampleBuilder(source, vocab, load_tokenizer(), max_text_len, max_regions)
    done = write_shards(records, builder, out, task, on_bad_sample)  # type: ignore[arg-type]
    stats = done.coverage.summary()
    typer.echo(
        f"wrote {done.samples} samples ({done.anchors} anchors, {done.skipped} skipped) to {out}"
    )
    for line in report(stats):
        typer.echo(line)
    if stats["share_with_anchor"] == 0:
        typer.echo(
            f"warning: no sample in {out} has an anchor: AMC and the associative prompt "
            "learn nothing from it (see the classes and --synonyms / --stoplist above)",
            err=True,
        )


@data_app.command("coverage")
@user_errors
def data_coverage(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="One of: " + ", ".join(FORMATS)),
    classes: Path = typer.Option(..., help="Detector class list (objects_vocab.txt)."),
    synonyms: str = typer.Option("default", help="Synonym table: default, none or a file."),
    stoplist: str = typer.Option("default", help="Stop-list: default, none or a file."),
    captions: Path | None = typer.Option(None, help="coco-captions / karpathy file"),
    splits: str = typer.Option("train,restval", help="karpathy: the splits to read."),
    regions: Path | None = typer.Option(None, help="vg: region_descriptions.json"),
    questions: Path | None = typer.Option(None, help="vqa: questions json"),
    jsonl: Path | None = typer.Option(None, help="snli-ve: snli_ve_<split>.jsonl"),
    statements: Path | None = typer.Option(None, "--json", help="nlvr2: <split>.json"),
    refs: Path | None = typer.Option(None, help="refcoco: refs(unc).p"),
    instances: Path | None = typer.Option(None, help="refcoco: instances.json"),
    split: str | None = typer.Option(None, help="refcoco: the split"),
    limit: int = typer.Option(0, min=0, help="Read only the first N texts (0: all)."),
) -> None:
    """Anchor coverage of a data set's texts against a class list, before any features:
    the share of texts naming at least one class (the most a detector can give)."""
    import itertools

    from cmal.data.convert import read_aliases, read_classes
    from cmal.data.convert.readers import annotation_records
    from cmal.data.coverage import report, text_coverage
    from cmal.data.vocab import make_vocab

    _, records = annotation_records(
        fmt,
        captions=captions, splits=splits,
        regions=regions, questions=questions, jsonl=jsonl, statements=statements, refs=refs,
        instances=instances, split=split,
    )  # fmt: skip
    vocab = make_vocab(read_classes(classes), None, read_aliases(classes), synonyms, stoplist)
    texts = (r.text for r in records)
    cov = text_coverage(itertools.islice(texts, limit) if limit else texts, vocab)
    for line in report(cov.summary(), "texts"):
        typer.echo(line)


@app.command("report")
@user_errors
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders (e.g. runs/claim-*)."),
    out: Path | None = typer.Option(None, help="Also write the tables to this Markdown file."),
    plot: Path | None = typer.Option(None, help="PNG: metric vs pre-training data fraction."),
) -> None:
    """A study's results: per task, arms x splits, mean ± std over seeds; CMAL against
    the contrastive baseline (win / tie / lose beyond two standard errors)."""
    from cmal.report import collect, comparisons, tables
    from cmal.report import plot as plot_fraction

    results = collect(runs)
    text = tables(results)
    versus = comparisons(results)
    if versus:
        text += "\n## CMAL vs the contrastive baseline\n\n" + versus
    typer.echo(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if plot:
        made = plot_fraction(results, plot)
        typer.echo(f"wrote {made}" if made else "no cmal/contrastive arms: no plot")


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
    from cmal.visualize import visualize

    for path in visualize(runs, out, shards, n):
        typer.echo(f"wrote {path}")


ImagesOption = typer.Option(..., "--images", help="Folder of images, or s3://bucket/prefix.")
FeaturesOutOption = typer.Option(..., "--out", help="Folder for the <key>.npz feature files.")
DetectorOption = typer.Option("centernet", "--detector", help="centernet or frcnn")
DetectSettings = typer.Argument(
    None, help="Detector settings, e.g. weights=frcnn.pth min_confidence=0.3 on_bad_image=skip"
)


@app.command("extract")
@user_errors
def extract_cmd(
    images: str = ImagesOption,
    out: Path = FeaturesOutOption,
    detector: str = DetectorOption,
    settings: list[str] = DetectSettings,
) -> None:
    """Detect regions in images and write their features (resumable; ranks split the images)."""
    from cmal.detect.extract import run_extract

    done, rank, world = run_extract(images, str(out), detector, settings or [])
    typer.echo(
        f"rank {rank}/{world}: extracted {done.done} images ({done.regions} regions, "
        f"{done.images_per_s} images/s), {done.already} already done, {len(done.skipped)} "
        f"skipped, {done.converted} converted to RGB -> {out}"
    )
    for why in done.skipped.values():
        typer.echo(f"  skipped {why}")


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


# --------------------------------------------------------------------------- cluster

NodesOption = typer.Option(None, "--nodes", help="Nodes (default: the profile's).")
GpusOption = typer.Option(None, "--gpus-per-node", help="GPUs per node (default: the profile's).")
ClusterOption = typer.Option(
    None, "--cluster", help="Profile: cluster/<name>.yaml or a path (default: slurm if "
    "sbatch is installed, else local)."
)  # fmt: skip
DryRunOption = typer.Option(False, "--dry-run", help="Print the job script and config only.")


def _submit(spec, cluster, nodes, gpus, dry_run: bool, shown: str) -> None:
    from cmal import launch

    path, prof = launch.load(cluster, nodes, gpus)
    if prof.executor == "slurm" and spec.kind != "extract":  # extract saves per image
        spec.overrides = [*spec.overrides, f"checkpoint.signal=SIG{prof.signal}"]
    if dry_run:
        typer.echo(f"# profile {path}: {prof.executor}, {prof.nodes} node(s)")
        if prof.executor == "slurm":
            typer.echo(launch.sbatch_script(prof, spec))
        else:
            typer.echo("cmal " + " ".join(spec.argv()))
        typer.echo(shown)
        return
    if prof.executor == "local":
        code = launch.run_local(prof, spec)
        if code:
            raise typer.Exit(code)
        return
    job = launch.submit_slurm(prof, spec, f"--cluster {path}")
    typer.echo(f"submitted job {job}: {spec.kind} {spec.name} on {prof.nodes} node(s)")
    typer.echo(f"  cmal status {spec.name}   # logs: {Path(prof.jobs) / spec.name}")


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
    from cmal.launch import JobSpec

    cfg = load_config(config, overrides or [])
    spec = JobSpec("pretrain", cfg.name, config, list(overrides or []))
    _submit(spec, cluster, nodes, gpus_per_node, dry_run, "# resolved config\n" + to_yaml(cfg))


@submit_app.command("finetune")
@user_errors
def submit_finetune(
    task: str = typer.Option(..., help="vqa, ve, nlvr2 or rec"),
    source: str | None = typer.Option(None, "--from", help="Pre-training run or weights."),
    config: str | None = ConfigOption,
    overrides: list[str] = Overrides,
    nodes: int | None = NodesOption,
    gpus_per_node: int | None = GpusOption,
    cluster: str | None = ClusterOption,
    dry_run: bool = DryRunOption,
) -> None:
    """Fine-tune (then evaluate) as a job."""
    from cmal.downstream import finetune_config
    from cmal.launch import JobSpec

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
    from cmal.launch import JobSpec

    cfg = detect_config(detector, settings or [])
    name = f"extract-{Path(out).name}"
    spec = JobSpec("extract", name, overrides=list(settings or []), detector=detector,
                   images=images, out=str(Path(out).resolve()))  # fmt: skip
    _submit(spec, cluster, nodes, gpus_per_node, dry_run, f"# detector settings\n{cfg}")


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
    from cmal.launch import JobSpec
    from cmal.workflow import load_workflow

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
    from cmal import launch

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
    from cmal import launch

    _, prof = launch.load(cluster)
    gone = launch.cancel(prof, Path(run).name)
    typer.echo(
        f"cancelled: {' '.join(gone)}" if gone else "no job of this run is queued or running"
    )


if __name__ == "__main__":
    sys.exit(main())
