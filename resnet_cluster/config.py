"""The job file: one frozen, typed :class:`JobConfig`, validated at the edge.

Precedence, lowest first: the defaults below < the YAML file < ``--set a.b=value`` overrides
(values parsed as YAML) < a sweep's sample. Unknown keys are refused everywhere, so a typo such
as ``optim.lrr`` is an error, not a silently ignored setting.

Units: ``train.batch_size`` is the *global* batch (the paper's 128 on CIFAR, 256 on ImageNet),
split evenly over ``scaling.workers``. ``schedule.milestones`` count in the unit the training
length is given in (``train.iterations`` or ``train.epochs``). Test errors are percentages.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resnet_cluster import datasets
from resnet_cluster.errors import ConfigError

DEFAULT_STORE = "./runs-store"
STORE_ENV = "RESNET_CLUSTER_STORE"


def default_store() -> str:
    """``RESNET_CLUSTER_STORE`` if set, else ``./runs-store``; a job file's value wins over both."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    arch: str = "cifar_resnet20"
    # Section 3.3: A = zero-padding identity (the paper's CIFAR choice), B = projection only
    # where the shape changes, C = projections everywhere. Bottleneck nets take B or C.
    shortcut: Literal["A", "B", "C"] = "A"
    # null = the net's own block: standard (the paper's) or, for the *preact* names, preact.
    # no_relu / bn_after_add / bn_after_add_no_relu: gcr/torch-residual-networks' variants.
    block: Literal["standard", "no_relu", "bn_after_add", "bn_after_add_no_relu", "preact"] | None = None
    zero_init_residual: bool = False
    # Where a bottleneck puts stride 2: v1 = first 1x1 (the paper), v1.5 = the 3x3
    # (torchvision, fb.resnet.torch). null = the net's default (v1; v1.5 for preact_resnet200).
    bottleneck_stride: Literal["v1", "v1.5"] | None = None
    num_classes: int | None = Field(None, ge=1)  # null = 10 on CIFAR, 1000 on ImageNet


class DataConfig(_Section):
    dataset: Literal[datasets.names()] = "cifar10"  # the registry in datasets.py
    root: str = "./data/cifar10"
    # paper: CIFAR pad 4, random 32x32 crop, flip (Section 4.2); ImageNet shorter side in
    # [256, 480], random 224 crop, flip, mean subtraction, PCA lighting (Section 3.4).
    # inception (ImageNet only): random-resized crop, area 8-100%, ratio 3/4-4/3, flip.
    augment: Literal["paper", "inception", "none"] = "paper"
    # Sizes of the generated set when dataset is synthetic (learnable), and the side of its
    # square images: 32 is CIFAR-shaped, 224 ImageNet-shaped (for GPU throughput benchmarks;
    # 2560 images of 224x224 hold 385 MB of uint8 per worker).
    synthetic_train: int = Field(2560, ge=1)
    synthetic_test: int = Field(512, ge=1)
    synthetic_size: int = Field(32, ge=16, le=512)
    # Prepared shards (cifar10, imagenet): DataLoader worker processes per rank (0 = read in the
    # training process; null = for ImageNet's JPEGs one decoder per CPU of
    # scaling.cpus_per_worker but the one the training process uses, at least 1
    # (data.streaming.default_decoders); 0 for CIFAR-10's raw pixels, which need
    # no decoding: there the workers' IPC costs the training process more than reading does),
    # batches each worker prepares ahead, shards mixed per shuffle window, and whether each
    # shard's sha256 is checked as it is read. ImageNet only: AlexNet PCA lighting std (0 = off).
    loader_workers: int | None = Field(None, ge=0)
    prefetch_batches: int = Field(2, ge=1)
    shuffle_shards: int = Field(2, ge=1)
    verify_shards: bool = True
    lighting_std: float = Field(0.1, ge=0)


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1)  # global batch, over all workers
    iterations: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    eval_every_epochs: int = Field(1, ge=1)
    log_every_iterations: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.iterations and train.epochs")
        return self

    @property
    def unit(self) -> Literal["iterations", "epochs"]:
        return "iterations" if self.iterations is not None else "epochs"


class OptimConfig(_Section):
    # sgd: momentum_style picks the convention (docs/references.md §2; they differ at every lr change):
    #   pytorch  v = m*v + g,         w -= lr*v
    #   caffe    v = m*v + lr*g,      w -= v        (KaimingHe's released models)
    #   torch7   v = m*v + (1-m)*g,   w -= lr*v     (optim.sgd with dampening = momentum)
    # rmsprop / adagrad / adadelta follow Torch7's optim package as gcr used them (alpha, eps,
    # rho below); adadelta's lr only scales its step (1.0 is Zeiler's rule).
    solver: Literal["sgd", "rmsprop", "adagrad", "adadelta"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    momentum_style: Literal["pytorch", "caffe", "torch7"] = "pytorch"
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    # false: no weight decay on BN gamma/beta and on biases (Goyal et al. 2017 recipes)
    decay_bn_and_bias: bool = True
    alpha: float = Field(0.99, gt=0, lt=1)  # rmsprop: decay of the squared-gradient average
    rho: float = Field(0.9, gt=0, lt=1)  # adadelta: decay of both running averages
    eps: float | None = Field(None, gt=0)  # None: rmsprop 1e-8, adagrad 1e-10, adadelta 1e-6
    # Linear scaling rule (Goyal et al. 2017): lr * train.batch_size / reference_batch.
    scale_lr_with_batch: bool = False
    reference_batch: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _sgd_only(self) -> OptimConfig:
        if self.nesterov and (self.solver != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov needs optim.solver sgd and optim.momentum > 0")
        if self.nesterov and self.momentum_style == "torch7":
            raise ValueError(
                "optim.nesterov with momentum_style torch7 is undefined (Torch7's optim.sgd "
                "refuses nesterov with dampening); use momentum_style pytorch or caffe"
            )
        return self


class WarmupConfig(_Section):
    """A low lr at the start.

    ``policy: constant`` holds ``lr`` until the training error is below ``until_train_error``
    and/or for ``iterations`` (the paper's ResNet-110: 0.01 until below 80%, about 400
    iterations; gcr: 0.001 for 400 iterations). ``policy: linear`` ramps from ``lr`` to the
    schedule's lr over ``iterations`` or ``epochs`` (Goyal et al. 2017: 5 epochs); its ``lr``
    defaults to the unscaled optim.lr with ``optim.scale_lr_with_batch``, else 0.
    """

    policy: Literal["constant", "linear"] = "constant"
    lr: float | None = Field(None, ge=0)
    until_train_error: float | None = Field(None, gt=0, le=100)  # percent
    iterations: int | None = Field(None, ge=1)  # a cap, or the whole warm-up if alone
    epochs: float | None = Field(None, gt=0)  # linear only: the length in epochs

    @model_validator(mode="after")
    def _has_end(self) -> WarmupConfig:
        if self.policy == "constant":
            if self.lr is None:
                raise ValueError("schedule.warmup with policy constant needs lr")
            if self.epochs is not None:
                raise ValueError("schedule.warmup.epochs is for policy linear; use iterations")
            if self.until_train_error is None and self.iterations is None:
                raise ValueError("schedule.warmup needs until_train_error, iterations, or both")
        else:
            if self.until_train_error is not None:
                raise ValueError("schedule.warmup.until_train_error is for policy constant")
            if (self.iterations is None) == (self.epochs is None):
                raise ValueError("schedule.warmup with policy linear needs one of iterations, epochs")
        return self


class ScheduleConfig(_Section):
    # multistep: lr * gamma^k after k milestones (in the unit of train.iterations/epochs).
    # plateau: lr * gamma when the (all-reduced) test error has not improved by `threshold`
    #   percentage points for more than `patience` evaluations (the paper's ImageNet recipe).
    # cosine: from lr to min_lr over the training length (after a linear warm-up, if any).
    policy: Literal["multistep", "constant", "plateau", "cosine"] = "multistep"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    patience: int = Field(2, ge=0)  # plateau: evaluations without improvement tolerated
    threshold: float = Field(0.1, ge=0)  # plateau: improvement that counts, percentage points
    min_lr: float = Field(0.0, ge=0)  # plateau: never below; cosine: the final lr
    warmup: WarmupConfig | None = None

    @field_validator("milestones")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])) or any(m <= 0 for m in v):
            raise ValueError(f"milestones must be positive and strictly ascending, got {v}")
        return v


class BNConfig(_Section):
    # PyTorch's (and Torch7's) convention: the weight of the new batch in the running average,
    # running = (1 - momentum) * running + momentum * batch. (Caffe's 0.999 is 1 - this.)
    momentum: float = Field(0.1, gt=0, le=1)
    # dynamic: momentum 1/(1+n), n = batches already seen this epoch (gcr), so each epoch's
    # running stats are the plain average over that epoch's batches.
    policy: Literal["fixed", "dynamic"] = "fixed"
    # >0: before every evaluation (so also after training) recompute the running mean and
    # variance exactly over this many training iterations (N * train.batch_size images, all
    # ranks together), as the released ImageNet models did ("precise BN").
    precise_batches: int = Field(0, ge=0)
    sync: bool = False  # SyncBatchNorm across DDP ranks (GPU only)


def gpu_share_problem(workers: int, use_gpu: bool, gpus_per_worker: float) -> str | None:
    """Why ``gpus_per_worker`` cannot work for ``workers`` DDP ranks, or None if it can.

    The loop trains on one device per rank (``ray.train.torch.get_device()`` returns one), so
    a rank given 2 GPUs leaves one idle; and below 1 GPU, Ray puts two ranks of one job on the
    same GPU, where NCCL stops at the first collective ("Duplicate GPU detected"). A fraction
    works for a single-worker job: the sweeps' way to share one GPU between trials.
    """
    if not use_gpu or gpus_per_worker == 1:
        return None
    if gpus_per_worker > 1:
        return (
            f"scaling.gpus_per_worker {gpus_per_worker:g}: each worker trains on one GPU (one "
            "DDP rank per GPU), so the others would sit idle. Use gpus_per_worker: 1 and one "
            "worker per GPU (scaling.workers: the number of GPUs to train on)"
        )
    if workers > 1:
        return (
            f"scaling.gpus_per_worker {gpus_per_worker:g} with {workers} workers: DDP ranks need "
            "whole GPUs (Ray would put two ranks on one GPU and NCCL refuses them, \"Duplicate "
            "GPU detected\"). Use gpus_per_worker: 1, or scaling.workers: 1 for a job (e.g. a "
            "sweep trial, trial_resources gpu) that shares a GPU"
        )
    return None
class WorkersRange(_Section):
    """``scaling.workers: {min: M, max: N}``: an elastic run on M..N workers (Ray Train's
    ``ScalingConfig(num_workers=(M, N))``). The recipe is that of N workers at every size: each
    optimizer step is N micro-batches of ``train.batch_size / N`` images; W < N workers each
    accumulate N / W of them (see ``engine.accumulation``)."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)


class ScalingSection(_Section):
    # An integer (a fixed-size run), or {min: M, max: N} (elastic; see WorkersRange).
    workers: int | WorkersRange = 2
    use_gpu: bool = False
    # GPUs per worker: 1, or a fraction of one GPU for a single-worker job (gpu_share_problem).
    gpus_per_worker: float = Field(1, gt=0, allow_inf_nan=False)
    # CPUs per worker: the torch threads of the training process, and the default number of
    # JPEG decoder processes (data.loader_workers). At most a large node's worth.
    cpus_per_worker: float = Field(1, gt=0, le=1024, allow_inf_nan=False)
    # Ray placement-group strategy for the worker bundles: PACK fills nodes first, SPREAD spreads
    # them best-effort, STRICT_SPREAD puts every worker on a different node.
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # Exactly this many workers per node: each worker asks for 1/N of the custom resource
    # `node_resource`, which every worker node declares as 1 (infra/aws/cluster.yaml does).
    workers_per_node: int | None = Field(None, ge=1)
    node_resource: str = "worker_node"
    # Elastic runs: how often (seconds) Ray Train looks for room to grow back towards max
    # (ScalingConfig.elastic_resize_monitor_interval_s, Ray's default 60).
    resize_check_s: float = Field(60.0, ge=0)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        # One message for either form, rather than pydantic's error per union member.
        def count(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        if isinstance(v, WorkersRange) or count(v):
            return v
        if isinstance(v, dict):
            if set(v) != {"min", "max"} or not all(count(x) for x in v.values()):
                raise ValueError("a range takes exactly the keys min and max, each a number of "
                                 "workers (1 or more), e.g. {min: 4, max: 8}")
            if v["min"] > v["max"]:
                raise ValueError(f"min {v['min']} is above max {v['max']}")
            return v
        raise ValueError("must be a number of workers (1 or more), or a range {min: M, max: N}")

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, WorkersRange) and self.workers.min < self.workers.max

    @property
    def min_workers(self) -> int:
        return self.workers.min if isinstance(self.workers, WorkersRange) else self.workers

    @property
    def max_workers(self) -> int:
        """N: the world size the recipe is written for (micro-batches per optimizer step)."""
        return self.workers.max if isinstance(self.workers, WorkersRange) else self.workers

    def describe_workers(self) -> str:
        """``8``, or ``4-8 (elastic)``: how --dry-run and the run's records show the size."""
        if self.elastic:
            return f"{self.min_workers}-{self.max_workers} (elastic)"
        return str(self.max_workers)

    @model_validator(mode="after")
    def _per_node(self) -> ScalingSection:
        problem = gpu_share_problem(self.max_workers, self.use_gpu, self.gpus_per_worker)
        if problem:
            raise ValueError(problem)
        if self.workers_per_node is not None:
            # With a range, nodes come and go whole: Ray Train counts workers as whole
            # per-node bundles (1/workers_per_node of node_resource each), so both ends must be
            # whole nodes.
            for end, n in (("min", self.min_workers), ("max", self.max_workers)):
                if n % self.workers_per_node:
                    what = f"scaling.workers {end}" if self.elastic else "scaling.workers"
                    raise ValueError(
                        f"{what} {n} is not a multiple of scaling.workers_per_node "
                        f"{self.workers_per_node}"
                        + (" (with a range, workers come and go a whole node at a time)" if self.elastic else "")
                    )
            if self.placement == "STRICT_SPREAD" and self.workers_per_node > 1:
                raise ValueError("scaling.placement STRICT_SPREAD puts one worker per node; "
                                 "drop scaling.workers_per_node or use PACK")
        return self


class CheckpointConfig(_Section):
    every_epochs: int = Field(1, ge=1)
    # Also checkpoint every K optimizer steps (mid-epoch; resumes at the exact position in the
    # epoch's order). null: at epoch ends only.
    every_iterations: int | None = Field(None, ge=1)
    keep: int = Field(2, ge=1)
    # async: rank 0 hands the checkpoint to Ray Train's upload thread and trains on
    # (ray.train.report(checkpoint_upload_mode=ASYNC)); sync: every rank waits for the upload.
    upload: Literal["async", "sync"] = "async"


class FailureSection(_Section):
    max_failures: int = Field(0, ge=-1)  # -1: retry forever, as in Ray's FailureConfig
    # Seconds one start or restart of the worker group may wait for its resources (a lost
    # node's replacement, nodes an autoscaler adds) before the run fails; -1: wait forever
    # (Ray Train's own default, retrying every 60 s).
    start_timeout_s: float = 900.0

    @field_validator("start_timeout_s")
    @classmethod
    def _positive_or_forever(cls, v: float) -> float:
        if v != -1 and v <= 0:
            raise ValueError("must be a number of seconds above 0, or -1 to wait forever")
        return v


class PrecisionConfig(_Section):
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype; fp16 adds a GradScaler
    channels_last: bool = False  # NHWC activations and weights (faster convs on tensor cores)
    compile: bool = False  # torch.compile the model
    # Bitwise-repeatable training on one setup: torch.use_deterministic_algorithms(True) (an op
    # without a deterministic kernel raises instead of running), cudnn.benchmark off and
    # cudnn.deterministic on, and CUBLAS_WORKSPACE_CONFIG=:4096:8 before cuBLAS starts
    # (engine/device.py; README "Determinism" says what this promises and what it does not).
    deterministic: bool = False
    # torch.compile backend: inductor (fast kernels; minutes to compile on a CPU), or e.g.
    # aot_eager / eager to check that a model traces without generating code
    compile_backend: str = "inductor"

    @model_validator(mode="after")
    def _known_backend(self) -> PrecisionConfig:
        if self.compile and self.compile_backend != "inductor":
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in known:
                raise ValueError(
                    f"precision.compile_backend {self.compile_backend!r} is not a torch.compile "
                    f"backend here; choose one of {', '.join(sorted(known))}"
                )
        return self


class EvalConfig(_Section):
    # ImageNet views: 1crop (shorter side 256, centre 224), 10crop (4 corners + centre and their
    # flips, softmax averaged), multiscale (fully convolutional, scores averaged over scales).
    # CIFAR is always the single original 32x32 view, which is what 1crop means there.
    protocol: Literal["1crop", "10crop", "multiscale"] = "1crop"


class ArtifactsConfig(_Section):
    store: str = Field(default_factory=default_store)
    # S3-compatible endpoint (MinIO, Ceph, ...) for an s3:// store; None = $RESNET_CLUSTER_STORE_ENDPOINT,
    # else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS itself. Credentials never go here.
    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("RESNET_CLUSTER_STORE_ENDPOINT") or None
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. http://minio.local:9000")
        if "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("must not hold credentials; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        return v


class JobConfig(_Section):
    name: str = "job"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(iterations=64000)
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    bn: BNConfig = BNConfig()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointConfig = CheckpointConfig()
    failure: FailureSection = FailureSection()
    precision: PrecisionConfig = PrecisionConfig()
    eval: EvalConfig = EvalConfig()
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("name may hold letters, digits, '.', '_' and '-' (at most 100)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        w, b = self.scaling.max_workers, self.train.batch_size
        if b % w:
            field = "scaling.workers max" if self.scaling.elastic else "scaling.workers"
            raise ValueError(
                f"train.batch_size {b} does not split evenly over {field} {w}; "
                f"choose a batch that is a multiple of {w} (the batch is global, "
                f"{b}/{w} = {b / w:g} images per worker)"
            )
        if self.scaling.elastic and self.bn.sync:
            raise ValueError(
                "bn.sync with a scaling.workers range: SyncBatchNorm normalises over the "
                "micro-batches of all workers at once, so its statistics would change with the "
                "world size (the recipe would not be exact). Use a fixed scaling.workers or "
                "bn.sync: false"
            )
        if self.precision.amp == "fp16" and not self.scaling.use_gpu:
            raise ValueError("precision.amp fp16 needs scaling.use_gpu: true; use bf16 on CPUs")
        if self.bn.sync and not self.scaling.use_gpu:
            raise ValueError(
                "bn.sync (SyncBatchNorm) needs scaling.use_gpu: true; PyTorch's SyncBatchNorm "
                "trains on GPUs only. Use bn.precise_batches for exact statistics on CPUs"
            )
        s = self.schedule
        if s.policy == "plateau" and s.milestones:
            raise ValueError("schedule.milestones are for policy multistep; plateau drops on the test error")
        return self

    @property
    def per_worker_batch(self) -> int:
        """Images per worker per step at the full size N; with fewer workers, the micro-batch."""
        return self.train.batch_size // self.scaling.max_workers

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _format_errors(err: ValidationError, source: str, data: dict) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        field = _loc(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _section_for(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"unknown key `{field}` (allowed here: {allowed})")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"].startswith("value_error") and not loc:
            lines.append(msg)
            continue
        lines.append(f"field `{field}`: got {e.get('input')!r}: {msg}")
    return f"{source}: invalid job: " + "; ".join(lines) + "."


def _section_for(loc: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = JobConfig
    for part in loc:
        f = cls.model_fields.get(str(part))
        if f is None:
            return None
        ann = f.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return cls


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"--set {text!r}: expected KEY.PATH=VALUE, for example --set optim.lr=0.01 "
            "or --set schedule.milestones=[400,500]."
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e}).") from None
    return key.strip().split("."), value


# Keys of which a job gives exactly one: setting one of them from a later source (``--set``, a
# sweep's ``set`` or grid) replaces the other, so ``--set train.iterations=20`` turns a job that
# counts epochs into one that counts iterations. Within one file, giving both is still an error.
EXCLUSIVE_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("train", "iterations"): ("train", "epochs"),
    ("train", "epochs"): ("train", "iterations"),
}


def set_dotted(data: dict, path: list[str], value: Any, *, what: str) -> None:
    """Set ``data[path[0]][path[1]]… = value`` in place, creating sections on the way.

    A non-null value for one of :data:`EXCLUSIVE_KEYS` drops its partner: the later source wins.
    """
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: `{part}` is a value, not a section.")
        node = child
    node[path[-1]] = copy.deepcopy(value)
    partner = EXCLUSIVE_KEYS.get(tuple(path))
    if partner is not None and value is not None and partner[:-1] == tuple(path[:-1]):
        node.pop(partner[-1], None)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(data, path, value, what=f"--set {text!r}")
    return data


def validate(data: dict, *, source: str = "job") -> JobConfig:
    """The schema check alone. Jobs are loaded with ``models.jobs.from_dict`` / ``models.jobs.load``,
    which also refuse a model the registry would refuse (config sits below models)."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, data)) from None


def read_job_file(path: str | os.PathLike, *, missing_hint: str = "for example jobs/smoke.yaml") -> dict:
    """The raw mapping of a job YAML (not validated). Raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file {str(p)!r} does not exist. Pass the path of a job YAML, {missing_hint}.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a job file must be a mapping of sections, got {type(data).__name__}.")
    return data
