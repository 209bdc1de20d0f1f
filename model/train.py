"""MCIE-E1 training (paper 3.2, "Training Procedure", Eq. 12): ``mcie train --config FILE [--resume]``.

The loss is Eq. 12, ``|| eps - eps_theta(Cat(z_t, E(x)), B, y, t) ||^2`` (``v`` instead of ``eps`` when the base's
scheduler predicts ``v_prediction``), with InstructPix2Pix's conventions (:mod:`model.network`): target latents are a
VAE sample times the scaling factor, source latents the posterior's mode, ``t`` uniform over the training timesteps.
Only ``MCIEModel.trainable_parameters()`` (LoRA, SACA, BCCA, the processors' projections) are optimised (AdamW).

One config (:mod:`model.train_config`) holds the paper's stages; each stage has its own data, steps, batch size,
gradient accumulation, learning rate, warmup and schedule, and starts a fresh AdamW on the weights the previous
stage left. Condition dropout (InstructPix2Pix, for classifier-free guidance): each sample independently drops its
text with probability ``text``, its source image with ``image``, both with ``both`` (5 % each by default).

Outputs (``output_dir``)::

    train_config.json                 the config of the run
    checkpoints/step-00001000/        accelerate save_state: optimizer, LR schedule, grad scaler, RNG states,
                                      weights/ (save_weights: trained tensors only, not the frozen base),
                                      trainer_state.json (step, stage, config), data_state_<rank>.json (position)
    logs/mcie-train/                  TensorBoard: train/loss, train/lr, train/steps_per_s, train/samples_per_s
    stage-<name>/                     the weights at the end of each stage
    mcie_e1.safetensors, mcie_config.json, train_summary.json    the final weights (model.weights.save_weights)

**Exact resume.** ``--resume`` continues from the newest checkpoint: the trained tensors, AdamW's moments, the LR
schedule and the grad scaler are restored by ``Accelerator.load_state``; the data position is the (epoch, batch)
counter of each process. Nothing random depends on history: the sample order of an epoch is a permutation seeded by
``(seed, stage, epoch)`` (the skipped batches of a JSONL stage are not even read), and each micro-batch's noise,
timesteps, VAE sample and condition dropout come from a generator seeded by ``(seed, process, step, micro-batch)``.
So training 2N steps straight and N steps + resume + N steps give the same weights (tested). A WebDataset stage
re-reads (and decodes) the batches it skips within the current epoch.

Multi-GPU: ``accelerate launch -m mcie.cli train --config FILE`` (DDP with ``find_unused_parameters``, since a
batch may drop every text and leave SACA unused); ``batch_size`` is per device.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcie.model.train_config import ConditioningDropout, DataConfig, StageConfig, TrainConfig, TrainConfigError

if TYPE_CHECKING:
    from mcie.config import Settings
    from mcie.model.network import MCIEModel

__all__ = [
    "CHECKPOINTS",
    "StageData",
    "TrainError",
    "TrainResult",
    "condition_dropout",
    "derive_seed",
    "find_checkpoint",
    "sub_instruction_lists",
    "train",
]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
CONFIG_NAME = "train_config.json"
SUMMARY_NAME = "train_summary.json"
STATE_FORMAT = "mcie-train-state/1"
TRACKER_NAME = "mcie-train"
_LR_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says which file, key or folder is at fault."""


@dataclass
class TrainResult:
    """What one call of :func:`train` did. ``losses`` maps each global step run in this call to its loss (the mean
    over micro-batches and processes)."""

    output_dir: Path
    global_step: int
    total_steps: int
    finished: bool
    losses: dict[int, float] = field(default_factory=dict)
    resumed_from: Path | None = None
    weights: Path | None = None


# --------------------------------------------------------------------------------------------------------------
# pure helpers


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def condition_dropout(
    batch: int, dropout: ConditioningDropout, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(drop_text, drop_image)`` bool tensors of shape ``(batch,)``: one uniform draw per sample falls in the
    text-only band ``[0, text)``, the both band ``[text, text + both)``, the image-only band after it, or none."""
    u = torch.rand(batch, generator=generator)
    drop_text = u < dropout.text + dropout.both
    drop_image = (u >= dropout.text) & (u < dropout.text + dropout.both + dropout.image)
    return drop_text, drop_image


def sub_instruction_lists(batch: dict[str, Any]) -> tuple[list[list[str]], list[list[Any]]] | tuple[None, None]:
    """Per-sample sub-instruction texts and boxes (``None`` = whole image) of a :func:`collate_edit_batch` batch,
    without the padding; ``(None, None)`` when no sample has any."""
    texts: list[list[str]] = []
    boxes: list[list[Any]] = []
    rows = zip(batch["sub_instructions"], batch["sub_mask"].tolist(), batch["boxes"].tolist(),
               batch["box_mask"].tolist(), strict=True)
    for row_texts, row_valid, row_boxes, row_has_box in rows:
        sample_texts, sample_boxes = [], []
        for text, valid, box, has_box in zip(row_texts, row_valid, row_boxes, row_has_box, strict=True):
            if valid:
                sample_texts.append(text)
                sample_boxes.append(tuple(box) if has_box else None)
        texts.append(sample_texts)
        boxes.append(sample_boxes)
    if not any(texts):
        return None, None
    return texts, boxes


def find_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return max(found, key=lambda p: int(p.name.removeprefix("step-")), default=None)


def _has_run(output_dir: Path) -> bool:
    from mcie.model.weights import WEIGHTS_NAME

    return find_checkpoint(output_dir) is not None or (Path(output_dir) / WEIGHTS_NAME).is_file()


def _shards(data: DataConfig) -> str | list[str]:
    path = Path(data.path)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob(f"{data.split}-*.tar"))
        if not shards:
            raise TrainError(f"data.path {data.path}: no {data.split}-*.tar WebDataset shards in the folder")
        return shards
    if any(c in data.path for c in "*?["):
        shards = sorted(glob.glob(data.path))
        if not shards:
            raise TrainError(f"data.path {data.path}: the pattern matches no file")
        return shards
    if "{" in data.path:
        return data.path
    if path.is_file():
        return [str(path)]
    raise TrainError(f"data.path {data.path}: no such folder or file")


# --------------------------------------------------------------------------------------------------------------
# data


class StageData:
    """The micro-batches of one stage on one process, in a deterministic, resumable order.

    :meth:`stream` yields ``(batch, epoch, next_batch)``, where ``(epoch, next_batch)`` is the position to resume
    from after that batch. Each process takes its share of every epoch (JSONL: a strided slice of the seeded
    permutation; WebDataset: its shards, split by ``webdataset``); incomplete batches are dropped.
    """

    def __init__(self, data: DataConfig, batch_size: int, seed: int, stage_index: int, *, rank: int = 0,
                 world: int = 1, max_sub_instructions: int | None = None, pin_memory: bool = False) -> None:
        from mcie.model.data import ExportDataError, JsonlEditDataset

        self.data, self.batch_size, self.seed, self.stage_index = data, batch_size, seed, stage_index
        self.rank, self.world, self.max_sub, self.pin_memory = rank, world, max_sub_instructions, pin_memory
        self.dataset: Any = None
        self.urls: str | list[str] | None = None
        if data.format == "jsonl":
            try:
                self.dataset = JsonlEditDataset(data.path, data.split, data.resolution,
                                                max_sub_instructions=max_sub_instructions)
            except ExportDataError as exc:
                raise TrainError(f"data.path: {exc}") from None
            if len(self.dataset) // world < batch_size:
                raise TrainError(
                    f"data.path {data.path}: {len(self.dataset)} samples in {self.dataset.path.name} are fewer than "
                    f"one batch ({batch_size} per process x {world} processes)"
                )
        else:
            self.urls = _shards(data)

    def epoch_indices(self, epoch: int) -> list[int]:
        """JSONL: this process's sample indices of ``epoch``, a whole number of batches."""
        n = len(self.dataset)
        if self.data.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "data", self.stage_index, epoch))
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        mine = order[: (n // self.world) * self.world][self.rank :: self.world]
        return mine[: (len(mine) // self.batch_size) * self.batch_size]

    def _loader(self, source: Any, sampler: Any = None) -> Any:
        from torch.utils.data import DataLoader

        from mcie.model.data import collate_edit_batch

        return DataLoader(source, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_edit_batch,
                          num_workers=self.data.num_workers, drop_last=True, pin_memory=self.pin_memory)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from batch ``skip`` on."""
        if self.dataset is not None:
            indices = self.epoch_indices(epoch)[skip * self.batch_size :]
            if indices:
                yield from self._loader(self.dataset, indices)
            return
        from mcie.model.data import webdataset_pipeline

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*shardshuffle.*")
            pipeline = webdataset_pipeline(
                self.urls or [], self.data.resolution, shuffle_buffer=self.data.shuffle_buffer if self.data.shuffle
                else 0, shuffle_shards=self.data.shuffle, max_sub_instructions=self.max_sub,
                seed=derive_seed(self.seed, "data", self.stage_index, epoch) % (1 << 31),
            )
        yield from itertools.islice(iter(self._loader(pipeline)), skip, None)

    def stream(self, epoch: int = 0, batch: int = 0) -> Iterator[tuple[dict[str, Any], int, int]]:
        """Batches forever, from position ``(epoch, batch)``."""
        while True:
            produced = 0
            for produced, item in enumerate(self.epoch_batches(epoch, batch), start=1):
                yield item, epoch, batch + produced
            if produced == 0 and batch == 0:
                raise TrainError(
                    f"data.path {self.data.path}: epoch {epoch} gave no complete batch of {self.batch_size} samples"
                )
            epoch, batch = epoch + 1, 0


# --------------------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class _Position:
    stage: int = 0
    stage_step: int = 0
    global_step: int = 0
    epoch: int = 0
    batch: int = 0


class _Trainer:
    def __init__(self, config: TrainConfig, settings: Settings | None, progress: bool, source: str) -> None:
        self.config, self.settings, self.progress, self.source = config, settings, progress, source
        self.output_dir = Path(config.output_dir)
        self.accelerator: Any = None
        self.core: MCIEModel | None = None
        self.model: Any = None
        self.optimizer: Any = None
        self.lr_scheduler: Any = None
        self.noise_scheduler: Any = None
        self.losses: dict[int, float] = {}
        self.pos = _Position()

    # --- setup ------------------------------------------------------------------------------------------------

    def _base_model(self) -> Path:
        if self.config.base_model:
            return Path(self.config.base_model)
        settings = self.settings
        if settings is None:
            from mcie.config import get_settings

            settings = get_settings()
        if settings.editing_base_model_path is None:
            raise TrainError(
                f"{self.source}: base_model is not set and neither is MCIE_EDITING_BASE_MODEL_PATH "
                "(the InstructPix2Pix folder to train on)"
            )
        return Path(settings.editing_base_model_path)

    def _vision_checkpoint(self) -> str | None:
        checkpoint = self.config.vision_checkpoint or self.config.model.clip_vision_checkpoint
        if self.config.model.use_bcca and not checkpoint:
            raise TrainError(
                f"{self.source}: BCCA needs an open_clip vision checkpoint: set vision_checkpoint "
                "(or model.clip_vision_checkpoint)"
            )
        if checkpoint:  # a file, a Hub id or a pretrained tag (mcie.hub); kept as given in the saved config
            from mcie.hub import resolve_open_clip

            try:
                resolve_open_clip(self.config.model.clip_vision_model, checkpoint, "vision_checkpoint")
            except FileNotFoundError as exc:
                raise TrainError(f"{self.source}: {exc}") from None
        return checkpoint

    def _check_resume(self, checkpoint: Path) -> _Position:
        try:
            state = json.loads((checkpoint / STATE_NAME).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainError(f"{checkpoint / STATE_NAME}: cannot read the trainer state ({exc})") from None
        if state.get("format") != STATE_FORMAT:
            raise TrainError(f"{checkpoint / STATE_NAME}: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        try:
            saved = TrainConfig.from_data(state["config"], str(checkpoint / STATE_NAME))
        except (KeyError, TrainConfigError) as exc:
            raise TrainError(f"{checkpoint / STATE_NAME}: no usable config ({exc})") from None
        changed = saved.differences(self.config)
        if changed:
            raise TrainError(
                f"{self.source}: key {changed[0]} differs from the run being resumed ({checkpoint}); resuming "
                "exactly needs the same settings (only paths, workers, logging and checkpoint settings may change): "
                "restore it or use a new output_dir"
            )
        rank = self.accelerator.process_index
        data_file = checkpoint / f"data_state_{rank}.json"
        try:
            data_state = json.loads(data_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainError(f"{data_file}: cannot read the data position of process {rank} ({exc})") from None
        return _Position(int(state["stage"]), int(state["stage_step"]), int(state["global_step"]),
                         int(data_state["epoch"]), int(data_state["batch"]))

    def _make_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        config = self.config
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            log_with="tensorboard" if config.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            step_scheduler_with_optimizer=False,
        )
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _load_model(self) -> None:
        from mcie.model.network import MCIEModel
        from mcie.model.weights import load_weights, save_weights

        config = self.config
        vision = self._vision_checkpoint()
        model_config = config.model.model_copy(update={"clip_vision_checkpoint": vision})
        base = self._base_model()
        try:
            core = MCIEModel.from_pretrained(base, config=model_config, weights=config.init_weights,
                                             vision_checkpoint=vision)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise TrainError(f"{self.source}: cannot load the model: {exc}") from None
        if not core.trainable_parameters():
            raise TrainError(f"{self.source}: the model has nothing to train")
        core.train()
        for frozen in (core.vae, core.text_encoder, core.vision):
            if frozen is not None:
                frozen.eval()
        if config.gradient_checkpointing:
            core.unet.enable_gradient_checkpointing()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
        if dtype is not None and config.cast_frozen:
            for parameter in core.parameters():
                if not parameter.requires_grad:
                    parameter.data = parameter.data.to(dtype)
        self.core = core
        self.noise_scheduler = core.noise_scheduler()

        accelerator = self.accelerator

        def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
            if accelerator.is_main_process:
                save_weights(accelerator.unwrap_model(models[0]), Path(output_dir) / "weights")
            weights.clear()  # the frozen base is not part of a checkpoint

        def load_hook(models: list[Any], input_dir: str) -> None:
            load_weights(accelerator.unwrap_model(models.pop()), Path(input_dir) / "weights")

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def _start_trackers(self) -> None:
        if not self.config.tensorboard:
            return
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(f"{prefix}[{i}]", item)
            else:
                flat[prefix] = value if isinstance(value, bool | int | float | str) else str(value)

        walk("", self.config.model_dump(mode="json"))
        self.accelerator.init_trackers(TRACKER_NAME, config=flat)

    # --- one stage --------------------------------------------------------------------------------------------

    def _prepare_stage(self, stage: StageConfig) -> None:
        from diffusers.optimization import get_scheduler

        accelerator, core = self.accelerator, self.core
        assert core is not None
        if self.model is not None:
            accelerator.free_memory()  # forget the previous stage's optimizer and schedule
            accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        opt = self.config.optimizer
        optimizer = torch.optim.AdamW(
            core.trainable_parameters(), lr=stage.learning_rate, betas=(opt.beta1, opt.beta2),
            weight_decay=opt.weight_decay, eps=opt.eps,
        )
        lr_scheduler = get_scheduler(_LR_SCHEDULERS[stage.lr_scheduler], optimizer,
                                     num_warmup_steps=stage.warmup_steps, num_training_steps=stage.steps)
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(core, optimizer, lr_scheduler)

    def _micro_step(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        core, accelerator = self.core, self.accelerator
        assert core is not None
        device = accelerator.device
        source = batch["source"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        with torch.no_grad():
            latents = core.encode_target_latents(target, generator=generator).float()
            source_latents = core.encode_source_latents(source).float()
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (size,), generator=generator)
        timesteps = timesteps.to(device)
        drop_text, drop_image = condition_dropout(size, self.config.conditioning_dropout, generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        texts, boxes = sub_instruction_lists(batch) if core.saca is not None else (None, None)
        prediction = self.model(
            noisy, timesteps, source_latents, list(batch["instruction"]), texts, boxes,
            source_pixels=source if core.bcca is not None else None,
            drop_text=drop_text.to(device), drop_image=drop_image.to(device),
        )
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target_value = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target_value = noise
        return torch.nn.functional.mse_loss(prediction.float(), target_value.float())

    def _optimizer_step(
        self, stage: StageConfig, stream: Iterator[tuple[dict[str, Any], int, int]]
    ) -> tuple[float, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches: (mean loss, learning rate)."""
        accelerator, core = self.accelerator, self.core
        assert core is not None
        accum = stage.gradient_accumulation_steps
        losses = []
        for micro in range(accum):
            batch, epoch, next_batch = next(stream)
            generator = torch.Generator().manual_seed(
                derive_seed(self.config.seed, "step", accelerator.process_index, self.pos.global_step, micro)
            )
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(self.model)
            with sync:
                with accelerator.autocast():
                    loss = self._micro_step(batch, generator)
                accelerator.backward(loss / accum)
            losses.append(loss.detach())
            self.pos.epoch, self.pos.batch = epoch, next_batch
        if self.config.optimizer.max_grad_norm > 0:
            accelerator.clip_grad_norm_(core.trainable_parameters(), self.config.optimizer.max_grad_norm)
        lr = float(self.lr_scheduler.get_last_lr()[0])  # the rate this step uses
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = torch.stack(losses).mean().reshape(1)
        return float(accelerator.gather(mean).mean().item()), lr

    # --- checkpoints ------------------------------------------------------------------------------------------

    def _save_checkpoint(self) -> Path:
        accelerator = self.accelerator
        root = self.output_dir / CHECKPOINTS
        name = f"step-{self.pos.global_step:08d}"
        final, partial = root / name, root / f".{name}.partial"
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        data_state = {"epoch": self.pos.epoch, "batch": self.pos.batch}
        (partial / f"data_state_{accelerator.process_index}.json").write_text(json.dumps(data_state) + "\n")
        if accelerator.is_main_process:
            stage = self.config.stages[self.pos.stage]
            state = {"format": STATE_FORMAT, "global_step": self.pos.global_step, "stage": self.pos.stage,
                     "stage_name": stage.name, "stage_step": self.pos.stage_step,
                     "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
                     "config": self.config.model_dump(mode="json")}
            (partial / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            keep = self.config.keep_checkpoints
            if keep is not None:
                done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name)
                for old in done[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    # --- the run ----------------------------------------------------------------------------------------------

    def run(self, resume: bool, resume_from: Path | None, stop_after: int | None) -> TrainResult:
        from mcie.model.weights import save_weights

        config = self.config
        checkpoint = None
        if resume_from is not None:
            checkpoint = Path(resume_from)
            if not (checkpoint / STATE_NAME).is_file():
                raise TrainError(f"--resume-from {checkpoint}: not a checkpoint folder (no {STATE_NAME})")
        elif resume:
            checkpoint = find_checkpoint(self.output_dir)
            if checkpoint is None:
                log.warning("no checkpoint in %s: starting from step 0", self.output_dir / CHECKPOINTS)
        elif _has_run(self.output_dir):
            raise TrainError(
                f"output_dir {self.output_dir} already holds a training run: pass --resume to continue it, "
                "or choose another output_dir"
            )
        for index, stage in enumerate(config.stages):
            self._stage_data_check(index, stage)
        self._make_accelerator()
        accelerator = self.accelerator
        if checkpoint is not None:
            self.pos = self._check_resume(checkpoint)
        resumed_from = checkpoint
        from accelerate.utils import set_seed

        set_seed(config.seed)
        self._load_model()
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / CONFIG_NAME).write_text(config.to_json() + "\n", encoding="utf-8")
        self._start_trackers()
        assert self.core is not None

        total = config.total_steps
        bar = None
        if self.progress and accelerator.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.pos.global_step, desc="mcie train", unit="step", dynamic_ncols=True)
        window_start, window_steps, window_losses = time.perf_counter(), 0, []
        stopped = False
        last_saved = -1
        for index, stage in enumerate(config.stages):
            if index < self.pos.stage:
                continue
            if index > self.pos.stage:
                self.pos = _Position(index, 0, self.pos.global_step, 0, 0)
            self._prepare_stage(stage)
            if checkpoint is not None:
                accelerator.load_state(str(checkpoint))
                last_saved = self.pos.global_step
                checkpoint = None
            max_sub = self.core.config.max_sub_instructions if self.core.config is not None else None
            data = StageData(stage.data, stage.batch_size, config.seed, index, rank=accelerator.process_index,
                             world=accelerator.num_processes, max_sub_instructions=max_sub,
                             pin_memory=accelerator.device.type == "cuda")
            stream = data.stream(self.pos.epoch, self.pos.batch)
            samples_per_step = stage.batch_size * stage.gradient_accumulation_steps * accelerator.num_processes
            while self.pos.stage_step < stage.steps:
                if stop_after is not None and self.pos.global_step >= stop_after:
                    stopped = True
                    break
                loss, lr = self._optimizer_step(stage, stream)
                self.pos.global_step += 1
                self.pos.stage_step += 1
                self.losses[self.pos.global_step] = loss
                window_steps += 1
                window_losses.append(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(stage=stage.name, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if self.pos.global_step % config.log_every == 0 or self.pos.stage_step == stage.steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    if config.tensorboard:
                        accelerator.log({"train/loss": sum(window_losses) / len(window_losses), "train/lr": lr,
                                         "train/steps_per_s": window_steps / elapsed,
                                         "train/samples_per_s": window_steps * samples_per_step / elapsed,
                                         "train/stage": index}, step=self.pos.global_step)
                    window_start, window_steps, window_losses = time.perf_counter(), 0, []
                if not math.isfinite(loss):
                    raise TrainError(f"step {self.pos.global_step}: the loss is {loss} (stage {stage.name})")
                if self.pos.global_step % config.checkpoint_every == 0:
                    self._save_checkpoint()
                    last_saved = self.pos.global_step
            if stopped:
                break
            if accelerator.is_main_process:
                save_weights(self.core, self.output_dir / f"stage-{stage.name}")
        if bar is not None:
            bar.close()
        if stopped:
            if last_saved != self.pos.global_step:
                self._save_checkpoint()
            return TrainResult(self.output_dir, self.pos.global_step, total, False, self.losses, resumed_from, None)
        weights = None
        if accelerator.is_main_process:
            weights = save_weights(self.core, self.output_dir)
            summary = {"global_step": self.pos.global_step, "total_steps": total,
                       "stages": [{"name": s.name, "steps": s.steps} for s in config.stages],
                       "final_loss": self.losses.get(self.pos.global_step),
                       "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
            (self.output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        accelerator.wait_for_everyone()
        return TrainResult(self.output_dir, self.pos.global_step, total, True, self.losses, resumed_from, weights)

    def _stage_data_check(self, index: int, stage: StageConfig) -> None:
        """Fail before loading the model when a stage's data is missing."""
        data = stage.data
        where = f"{self.source}: stages[{index}].data.path"
        if data.format == "jsonl":
            jsonl = Path(data.path) / f"{data.split}.jsonl"
            if not jsonl.is_file():
                raise TrainError(f"{where}: {jsonl} not found (a JSONL export holds <split>.jsonl and images/)")
        else:
            try:
                _shards(data)
            except TrainError as exc:
                raise TrainError(f"{where}: {exc}") from None

    def close(self) -> None:
        accelerator = self.accelerator
        if accelerator is None:
            return
        with contextlib.suppress(Exception):
            accelerator.end_training()
        if accelerator.num_processes == 1:
            # let a later train() in the same process choose another precision (accelerate's state is a singleton)
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state()
            GradientState._reset_state()


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    settings: Settings | None = None,
    source: str = "<config>",
) -> TrainResult:
    """Run (or continue, with ``resume`` / ``resume_from``) the training described by ``config``.

    ``stop_after``: stop once the global step reaches it, after saving a checkpoint (time-limited jobs; resume
    later with ``resume=True``). ``source`` names the config file in error messages.
    """
    if stop_after is not None and stop_after < 0:
        raise TrainError(f"stop_after must be at least 0, got {stop_after}")
    trainer = _Trainer(config, settings, progress, source)
    try:
        return trainer.run(resume, Path(resume_from) if resume_from is not None else None, stop_after)
    finally:
        trainer.close()
