"""The space.yaml sections: what each key accepts, its default, and the words an error shows.

Each section is a frozen pydantic model that forbids unknown keys; a field's `description` is
what `python -m sweep validate` and every error message say is accepted. Loading a file, applying
overrides and turning pydantic's errors into ours stay in sweep/config/.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, StringConstraints, model_validator

from core.contract import OBJECTIVE_METRICS as METRICS
from core.rules import TARGET_MODULES, TARGET_PRESETS

TINY_MODEL = "tiny-gemma3"
TINY_VISION_MODEL = "tiny-gemma3-vision"  # Gemma3ForConditionalGeneration with a tiny SigLIP tower
TINY_MODELS = (TINY_MODEL, TINY_VISION_MODEL)
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a sweep's `name`: letters, digits, '.', '_', '-'


# ----------------------------------------------------------------------------------------------
# value types with their own error text


def _target_modules(value: Any) -> Any:
    if isinstance(value, str):
        if value in TARGET_PRESETS:
            return value
        raise ValueError(f"expected a preset ({', '.join(TARGET_PRESETS)}) or a list of module names like [q_proj, v_proj]")
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w.]*", v) for v in value):
        if len(set(value)) != len(value):
            raise ValueError("module names repeat; list each once")
        return tuple(value)
    raise ValueError(f"expected a preset ({', '.join(TARGET_PRESETS)}) or a non-empty list of module names like [q_proj, v_proj]")


def _batch(value: Any) -> Any:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise ValueError("expected [micro_batch, accumulation], two positive integers, e.g. [4, 8]")


_DURATION_TEXT = r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$"
_DURATION = re.compile(_DURATION_TEXT)


def parse_duration(value: Any) -> float | None:
    """'8h', '1h30m', '45m', '90s', or a number of seconds -> seconds."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("expected a positive duration like 8h, 1h30m, 45m, 90s or seconds")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m and any(m.groups()):
            d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
            total = d * 86400 + h * 3600 + mi * 60 + s
            if total > 0:
                return total
    raise ValueError("expected a duration like 8h, 1h30m, 45m, 90s, or a number of seconds")


# Each BeforeValidator names what a file may hold (json_schema_input_type): the JSON Schema of a
# space file (search_spaces/space.schema.json, for editors) shows that, not the normalised type.
TargetModules = Annotated[
    Union[str, tuple[str, ...]],
    BeforeValidator(_target_modules, json_schema_input_type=Union[Literal[TARGET_PRESETS], Annotated[list[str], Field(min_length=1)]]),
]
Batch = Annotated[tuple[int, int], BeforeValidator(_batch, json_schema_input_type=tuple[PositiveInt, PositiveInt])]
Duration = Annotated[
    Union[float, None],
    BeforeValidator(parse_duration, json_schema_input_type=Union[Annotated[float, Field(gt=0)], Annotated[str, StringConstraints(pattern=_DURATION_TEXT)], None]),
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _switch(value: Any) -> Any:
    """on | off | auto; YAML reads bare on/off as booleans already."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("on", "off"):
        return value.lower() == "on"
    raise ValueError("expected on, off or auto")


Switch = Annotated[Union[bool, Literal["auto"]], BeforeValidator(_switch, json_schema_input_type=Union[bool, Literal["auto", "on", "off"]])]


class ModelSection(Section):
    id: str = Field(description="a hub id (google/gemma-3-1b-pt), a local folder, tiny-gemma3 or tiny-gemma3-vision (offline random tiny models)")
    chat_template_from: str | None = Field(None, description="hub id or folder whose chat template replaces the tokenizer's own (e.g. the -it model)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of model.id")
    embeddings: Literal["auto", "full", "new_tokens", "frozen"] = Field(
        "auto", description="auto, full (train embed_tokens + tied lm_head), new_tokens (train only the chat-template token rows) or frozen"
    )


class DataSection(Section):
    train: str = Field(description="a .jsonl/.json/.parquet file (relative to the space file) or a hub dataset id")
    eval: str | None = Field(None, description="held-out file or hub id; or use eval_fraction")
    eval_fraction: float | None = Field(None, gt=0, lt=0.5, description="fraction of train held out for eval, 0 < x < 0.5")
    split: str = Field("train", description="split of a hub dataset used for training")
    eval_split: str | None = Field(None, description="split of a hub dataset used for eval")
    max_seq_len: int = Field(1024, ge=16, le=131072, description="tokens per training sequence, 16..131072")
    packing: bool = Field(True, description="pack several examples into each sequence (true/false)")


class TrainSection(Section):
    """Fixed for every trial. The hyperparameters below `seed` may instead be searched in `space:`."""

    max_steps: int = Field(400, gt=0, description="optimizer steps per trial, > 0")
    eval_every: int = Field(50, gt=0, description="evaluate (and report to the scheduler) every N steps, > 0")
    log_every: int = Field(10, gt=0, description="log train_loss every N steps, > 0")
    eval_batch_size: int | None = Field(None, gt=0, description="sequences per eval batch; default: the micro-batch")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="auto (bf16 on GPUs that have it, else fp32), bfloat16, float16, float32")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="sdpa, eager, flash_attention_2 or flex_attention (block-sparse: skips the blocks a packed row's document mask removes)"
    )
    loss: Literal["auto", "chunked", "model", "liger"] = Field(
        "auto", description="auto (liger where CUDA runs and liger-kernel is installed, else chunked), chunked (lm_head + cross-entropy over reply tokens, "
        "a chunk at a time), model (every reply token's logits at once, as the model's own loss) or liger (liger-kernel's fused linear + cross-entropy; CUDA only)"
    )
    lora_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto (bfloat16 where the base computes in bf16, else float32), float32 or bfloat16 (LoRA A/B computed in bf16, fp32 master "
        "copies in the optimizer; needs dtype auto or bfloat16)"
    )
    compile: Switch = Field(
        "auto", description="on, off or auto (on a GPU when the workers train long enough to repay compiling: see validate's output): torch.compile "
        "each decoder layer (regional compilation)"
    )
    seed: int = Field(0, ge=0, description="seed for data order and adapter init (the same for every trial)")
    # searchable hyperparameters
    method: Literal["lora", "qlora"] = Field("lora", description="lora or qlora (4-bit NF4 base)")
    lora_r: int = Field(16, gt=0, le=4096, description="LoRA rank, 1..4096")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha, > 0")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout, 0 <= x < 1")
    target_modules: TargetModules = Field("all-linear", description=f"a preset ({', '.join(TARGET_PRESETS)}) or a list of module names")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="peak learning rate, 0 < x < 1")
    batch: Batch = Field((4, 8), description="[micro_batch, accumulation]")
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay, 0 <= x < 1")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of max_steps spent warming up, 0 <= x < 1")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="cosine, linear or constant (after warmup)")
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = Field("auto", description="auto (paged_adamw_8bit for qlora, adamw for lora), adamw, adamw_8bit or paged_adamw_8bit")
    gradient_checkpointing: Switch = Field("auto", description="on, off or auto (on when activations would take over a quarter of the GPU)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm, > 0")

    @model_validator(mode="after")
    def _lora_dtype_needs_bf16(self) -> "TrainSection":
        if self.lora_dtype == "bfloat16" and self.dtype in ("float32", "float16"):
            raise ValueError(f"train.lora_dtype: bfloat16 needs train.dtype auto or bfloat16 (got dtype {self.dtype}); set lora_dtype: float32 or change dtype")
        return self


SEARCHABLE = (
    "method", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "batch",
    "weight_decay", "warmup_ratio", "lr_scheduler", "optimizer", "max_grad_norm",
)  # fmt: skip
# Fixed settings a search cannot vary: they change how fast a trial trains, not what it learns, and
# a worker decides them once for every trial it trains together (trainable.cohort.COHORT_WIDE).
NOT_SEARCHABLE = {
    "gradient_checkpointing": "is decided once per worker for all the trials it trains together (it changes speed and memory, "
    "not results; auto turns it on when activations would not fit); set train.gradient_checkpointing: on, off or auto instead",
}
# What a trial's hyperparameters hold (fixed and sampled): what the memory estimates and a trial's
# MLflow params read.
HYPERPARAMS = (*SEARCHABLE, *NOT_SEARCHABLE)


class SchedulerSection(Section):
    type: Literal["asha", "hyperband", "median", "none"] = Field(
        "asha",
        description="Optuna's pruner, asked at each evaluation inside the workers: asha (successive halving: at each rung a trial goes on only in the best "
        "1/reduction_factor of those that reached it), hyperband (successive halving in several brackets of different first rungs; nothing is paused), "
        "median (stop a trial whose best so far is worse than the median of the others at the same step) or none",
    )
    grace_period: int | None = Field(None, gt=0, description="training steps before a trial can be stopped (asha: the first rung; median); default: train.eval_every")
    reduction_factor: int = Field(3, ge=2, description="asha / hyperband keep the best 1/reduction_factor at each rung; a whole number >= 2")
    max_t: int | None = Field(None, gt=0, description="hyperband: the step of its largest budget; default: train.max_steps")
    min_samples: int = Field(3, gt=0, description="median: trials that must have finished before it stops any, > 0")


def _max_concurrent(value: Any) -> Any:
    """auto | a positive integer: 0 or fewer trials at once would run nothing."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("expected auto or a positive number of trials at once")


class SearchSection(Section):
    algorithm: Literal["auto", "tpe", "random", "grid", "nsga2"] = Field(
        "auto", description="auto (grid when num_trials covers a discrete space, else tpe: see validate's output), tpe, random, grid or nsga2 (multi-objective)"
    )
    metric: str = Field("eval_loss", description=f"one of {', '.join(METRICS)}")
    mode: Literal["min", "max"] = Field("min", description="min or max")
    objectives: list[dict[str, Literal["min", "max"]]] | None = Field(
        None, description="several objectives instead of metric/mode, e.g. [{eval_loss: min}, {peak_vram_gb: min}]; the first also drives the scheduler"
    )
    num_trials: int | None = Field(None, gt=0, description="number of trials, > 0 (grid: defaults to the grid size)")
    max_concurrent: Annotated[Union[Literal["auto"], int], BeforeValidator(_max_concurrent, json_schema_input_type=Union[Literal["auto"], PositiveInt])] = Field(
        "auto", description="auto (as many as resources allow) or a positive integer"
    )
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection, description="{type: asha, grace_period, reduction_factor, max_t, min_samples}: Optuna's pruner")
    time_budget: Duration = Field(None, description="stop launching and end running trials after e.g. 8h, 45m")
    seed: int | None = Field(None, ge=0, description="sampler seed, >= 0")
    n_startup_trials: int | None = Field(None, gt=0, description="start-up trials before TPE models the space; default half the trials, at most 10 (at least 1)")
    startup: Literal["sobol", "random"] = Field(
        "sobol", description="how TPE's start-up trials are drawn: sobol (scrambled Sobol points, spread evenly over every dimension together: the search suite's best) or random (Optuna's default)"
    )
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list, description="configs to try first, e.g. [{lora_r: 16, learning_rate: 2.0e-4}]")
    warm_start: str | None = Field(None, description="a previous sweep's results folder: its finished trials feed the sampler, its best configs run first")
    warm_start_top: int = Field(3, ge=0, description="how many of the previous sweep's best configs to run first, >= 0")
    max_retries: int = Field(2, ge=0, description="times a trial whose worker or node died is retried from its last checkpoint, >= 0 (a trial that fails on its own is never retried)")


def _cohort(value: Any) -> Any:
    """auto | a positive integer. `off` (a second engine for lone trials, before every worker trained
    a cohort) is gone: 1 is what it meant."""
    if value is False or (isinstance(value, str) and value.lower() == "off"):
        raise ValueError("off is no longer a setting: every worker trains a cohort of trials on one loaded base model; 1 trains one trial per worker")
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("expected auto or a positive number of trials per worker")


COHORT_AUTO_CPU = 4  # resources.cohort: auto on a worker without a GPU (no memory estimate to fill)


class ResourcesSection(Section):
    gpus_per_trial: float | Literal["auto"] = Field(
        "auto", description="auto (each trial asks for the GPU share its memory estimate needs; 0 on a cluster without GPUs) or a number; fractions below 1 share a GPU"
    )
    cpus_per_trial: float = Field(1, gt=0, description="CPU cores per trial, > 0")
    gpu_memory_gb: float | Literal["auto"] = Field("auto", description="memory of one GPU for auto placement: auto (read from a GPU of the cluster) or GB, > 0")
    memory_margin: float = Field(0.2, ge=0, le=2, description="safety margin on the memory estimate for auto placement, 0..2 (0.2 = +20%)")
    cohort: Annotated[Union[Literal["auto"], int], BeforeValidator(_cohort, json_schema_input_type=Union[Literal["auto"], PositiveInt])] = Field(
        "auto", description="trials a worker trains at once on its one loaded base model: auto (as many as its GPU memory fits; 4 on a CPU) or N >= 1 (1: one trial per worker)"
    )


class TrackingSection(Section):
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (a server for multi-node sweeps; ${VAR} reads the environment); default sqlite:///<results_dir>/mlflow.db")
    optuna_storage: str | None = Field(None, description="Optuna storage URL, e.g. postgresql://user:${PGPASSWORD}@host/db for multi-node sweeps; default sqlite in the sweep's folder")
    experiment: str | None = Field(None, description="MLflow experiment; default: the sweep name")
    results_dir: str | None = Field(None, description="folder holding one subfolder per sweep; default ./sweeps in the current directory")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "search": SearchSection,
    "resources": ResourcesSection,
    "tracking": TrackingSection,
}
