"""``cmal data world|convert|coverage`` and ``cmal extract``: shards and region features."""

from __future__ import annotations

from pathlib import Path

import typer

from cmal.cli.app import app, data_app, user_errors
from cmal.data.convert.readers import FORMATS
from cmal.data.errors import DataError


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
        from cmal.model.pretrained import load_tokenizer

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
    workers: int = typer.Option(
        1, min=1, help="Processes, each writing a slice of the images (merged at the end)."
    ),
    part: str | None = typer.Option(
        None,
        metavar="K/N",
        help="Write only the K-th of N slices of the images (0-based; "
        "what each task of `cmal submit convert` runs); the last part to finish merges all.",
    ),  # fmt: skip
) -> None:
    """Write MDS shards from a public annotation format joined with region features, and
    report the anchor coverage (also in OUT/anchor_stats.json)."""
    import json

    from cmal.data.convert.public import convert_public
    from cmal.data.coverage import STATS_FILE, report

    files = {"captions": captions, "splits": splits, "regions": regions, "questions": questions,
             "annotations": annotations, "jsonl": jsonl, "statements": statements, "refs": refs,
             "instances": instances, "split": split}  # fmt: skip
    done = convert_public(
        fmt, features, out, files, classes=classes, attributes=attributes, synonyms=synonyms,
        stoplist=stoplist, labels=labels, hw=hw, max_text_len=max_text_len,
        max_regions=max_regions, on_bad_sample=on_bad_sample, workers=workers,
        part=_part(part), warn=lambda text: typer.echo(f"warning: {text}", err=True),
    )  # fmt: skip
    if done is None:
        typer.echo(f"part {part} of {out} written; the last part to finish merges them")
        return
    stats = json.loads((out / STATS_FILE).read_text())
    rate = f"{done.images / done.seconds:.1f} images/s" if done.seconds else ""
    typer.echo(
        f"wrote {done.samples} samples ({done.anchors} anchors, {done.skipped} skipped) of "
        f"{done.images} images to {out} in {done.seconds:.2f} s ({rate}, {workers} process"
        f"{'es' if workers > 1 else ''})"
    )
    for line in report(stats):
        typer.echo(line)
    if stats["share_with_anchor"] == 0:
        typer.echo(
            f"warning: no sample in {out} has an anchor: AMC and the associative prompt "
            "learn nothing from it (see the classes and --synonyms / --stoplist above)",
            err=True,
        )


def _part(text: str | None) -> tuple[int, int] | None:
    """``--part K/N`` as (K, N), or a one-line error."""
    if text is None:
        return None
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise DataError(f"--part {text}: expected K/N with 0 <= K < N, e.g. 0/4")
    return int(k), int(n)


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
