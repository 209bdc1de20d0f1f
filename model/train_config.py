"""The configuration of ``mcie train``: one TOML (or YAML) file describing a whole, possibly multi-stage, run.

The paper (3.2, "Training Procedure") trains MCIE-E1 in two stages with Eq. 12's loss: 20,000 steps on a subset of
OmniEdit-GoT, then 10,000 steps on the MCIE dataset. A config therefore holds the settings shared by the run
(base model, MCIE-E1 architecture, precision, optimizer, condition dropout, checkpoints, logging) and a list of
``[[stages]]``, each with its own data source, number of optimizer steps, batch size, gradient accumulation, learning
rate and warmup. Every stage starts a fresh AdamW and learning-rate schedule on the weights the previous stage left.

```toml
base_model = "models/instruct-pix2pix"        # default: MCIE_EDITING_BASE_MODEL_PATH
vision_checkpoint = "models/clip-vit-h-14.safetensors"
output_dir = "runs/mcie-e1"
mixed_precision = "fp16"

[model]                                       # model.config.MCIEConfig; defaults are the paper's model
lora_rank = 16

[[stages]]
name = "omniedit"
steps = 20000
batch_size = 8
learning_rate = 1e-4
data = { format = "webdataset", path = "exports/omniedit-got" }
```

Relative paths are taken from the current working directory (run ``mcie train`` from the repository root).
:func:`load_train_config` reads a file; every problem is a :class:`TrainConfigError` naming the file and the key
(``configs/x.toml: stages[1].data.path: Field required``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcie.model.config import MCIEConfig

__all__ = [
    "ConditioningDropout",
    "DataConfig",
    "OptimizerConfig",
    "StageConfig",
    "TrainConfig",
    "TrainConfigError",
    "load_train_config",
]

# keys that may change between a run and its resumption without changing what is computed
RESUMABLE_CHANGES = frozenset(
    {"base_model", "vision_checkpoint", "output_dir", "checkpoint_every", "keep_checkpoints", "log_every",
     "tensorboard", "data.path", "data.num_workers"}
)


class TrainConfigError(ValueError):
    """A training config cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where a stage's samples come from: an export written by ``mcie export`` (see ``docs/exports.md``).

    ``format = "jsonl"``: ``path`` is the export folder holding ``<split>.jsonl`` and ``images/``.
    ``format = "webdataset"``: ``path`` is the export folder (its ``<split>-*.tar`` shards are read), a glob
    (``exports/v3/train-*.tar``) or a brace pattern (``exports/v3/train-{000000..000009}.tar``).
    """

    format: Literal["jsonl", "webdataset"] = "jsonl"
    path: str = Field(min_length=1)
    split: str = Field("train", min_length=1)
    resolution: int = Field(512, ge=8, description="Images are resized to resolution x resolution.")
    shuffle: bool = Field(True, description="Shuffle samples (JSONL: a seeded permutation per epoch).")
    shuffle_buffer: int = Field(1000, ge=0, description="WebDataset: sample shuffle buffer (0 = off).")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")


class StageConfig(_Strict):
    """One training stage: its data and its optimisation schedule (``steps`` counts optimizer steps)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Used in folder names (stage-<name>/).")
    data: DataConfig
    steps: int = Field(ge=1)
    batch_size: int = Field(4, ge=1, description="Samples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_warmup(self) -> StageConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        return self


class OptimizerConfig(_Strict):
    """AdamW over ``MCIEModel.trainable_parameters()``; ``max_grad_norm = 0`` disables clipping."""

    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(1e-2, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)


class ConditioningDropout(_Strict):
    """InstructPix2Pix's condition dropout for classifier-free guidance: each sample independently loses its text
    only (``text``), its source image only (``image``) or both (``both``); the defaults are the paper's 5 % each."""

    text: float = Field(0.05, ge=0, le=1)
    image: float = Field(0.05, ge=0, le=1)
    both: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _check_total(self) -> ConditioningDropout:
        if self.text + self.image + self.both > 1 + 1e-9:
            raise ValueError(f"text + image + both must be at most 1, got {self.text + self.image + self.both:g}")
        return self


class TrainConfig(_Strict):
    """A whole training run (see the module docstring)."""

    base_model: str | None = Field(
        None, description="InstructPix2Pix folder or Hub id (default MCIE_EDITING_BASE_MODEL_PATH)."
    )
    vision_checkpoint: str | None = Field(None, description="BCCA's open_clip checkpoint file.")
    init_weights: str | None = Field(None, description="Start from this MCIE-E1 weights folder.")
    output_dir: str = Field(min_length=1)
    seed: int = Field(0, ge=0)
    model: MCIEConfig = Field(default_factory=MCIEConfig)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cast_frozen: bool = Field(True, description="Under mixed precision, keep the frozen weights in that dtype.")
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    conditioning_dropout: ConditioningDropout = Field(default_factory=ConditioningDropout)
    checkpoint_every: int = Field(1000, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int | None = Field(3, ge=1, description="Keep the newest N checkpoints (None: all).")
    log_every: int = Field(10, ge=1)
    tensorboard: bool = True
    stages: list[StageConfig] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [stage.name for stage in stages]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"stage names must be unique; {duplicated[0]!r} is used twice")
        return stages

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def differences(self, other: TrainConfig) -> list[str]:
        """Dotted keys (``stages[0].learning_rate``) whose values differ, ignoring :data:`RESUMABLE_CHANGES`."""
        return _diff(_comparable(self), _comparable(other), "")

    @classmethod
    def from_data(cls, data: Any, source: str = "<config>") -> TrainConfig:
        if not isinstance(data, dict):
            raise TrainConfigError(f"{source}: expected a table of settings, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{_loc(err['loc'])}: {_message(err)}" for err in exc.errors())
            raise TrainConfigError(f"{source}: {problems}") from None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _message(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    return message


def _comparable(config: TrainConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for key in RESUMABLE_CHANGES:
        if "." not in key:
            data.pop(key, None)
    for stage in data["stages"]:
        for key in RESUMABLE_CHANGES:
            if key.startswith("data."):
                stage["data"].pop(key.removeprefix("data."), None)
    return data


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{prefix}[{i}]")]
    return [] if a == b else [prefix or "<root>"]


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a ``.toml`` (or ``.yaml`` / ``.yml`` / ``.json``) training config; ``overrides`` replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: training config not found")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise TrainConfigError(f"{path}: expected a .toml, .yaml, .yml or .json file")
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise TrainConfigError(f"{path}: not valid YAML ({exc})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise TrainConfigError(f"{path}: not valid {suffix[1:].upper()} ({exc})") from None
    if isinstance(data, dict):
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig.from_data(data, str(path))
