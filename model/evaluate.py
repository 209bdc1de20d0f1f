"""Editing batches of images and scoring edits on a benchmark (paper 4.1: CIE-Bench and its metrics).

**Edit jobs** (``mcie edit --batch FILE.jsonl`` and CIE-Bench's ``bench.jsonl``) are JSON lines::

    {"id": "0001", "source": "images/0001.png", "instruction": "add a red kite and remove the bench",
     "sub_instructions": [{"text": "add a red kite in the sky", "operation": "add", "box": [0.61, 0.05, 0.83, 0.27]},
                          {"text": "remove the bench", "operation": "remove", "box": null}],
     "target": "images/0001_target.png", "seed": 0}

``id`` names the output file (``<id>.png``; letters, digits, ``._-``); ``source`` / ``target`` are paths relative to
the JSONL file (``{"path": ...}`` objects, as in exports, work too); boxes are normalised ``[x0, y0, x1, y1]`` or
``null`` (whole image). Without ``sub_instructions`` an MCIE-E1 edit asks the configured MLLM to decompose the
instruction; ``[]`` edits without spatial guidance. ``target``, ``seed`` and ``regions`` (a list of boxes: the edit
regions when they are not tied to sub-instructions; default: the sub-instructions' boxes) are optional.

**A benchmark folder** holds ``bench.jsonl`` (the lines above) and the images it names. With a ``target`` on every
item (MagicBrush) it is scored against the targets; without any (CIE-Bench as the paper describes it: source images,
complex instructions, human-drawn regions) it is scored reference-free, against the source (``reference`` of
:func:`evaluate`: ``auto`` picks by the bench, ``source`` forces the reference-free mode; a bench with targets on only
some items must say which). A method's outputs are one folder with ``<id>.png`` per item (``.jpg``, ``.jpeg``,
``.webp`` are accepted too); items without an output are reported as missing and left out of that method's means.

**Metrics** (:func:`evaluate`), per method, means over the items that have what a metric needs; "the reference" is the
target image, or the source image in the reference-free mode, and the report names it per column:

- ``clip_i``: cosine of the open_clip image embeddings of output and reference (``MCIE_CLIP_MODEL`` /
  ``MCIE_CLIP_CHECKPOINT``, open_clip's own preprocessing);
- ``dino_i``: cosine of the DINOv2 CLS embeddings (``Dinov2Model.pooler_output``, the layer-normed CLS token) of
  output and reference, from a transformers folder or Hub id; images resized (shorter side ``crop * 256 / 224``,
  bicubic), centre-cropped to ``crop`` (224) and ImageNet-normalised, as DINOv2's evaluations do;
- ``l1`` / ``l2``: mean absolute / mean squared pixel difference of output and reference, both resized to
  ``resolution`` x ``resolution`` (bicubic), RGB in [0, 1] (MagicBrush's L1 and L2 = MSE);
- ``bg_l1`` / ``bg_l2`` / ``bg_dino_i``: background consistency where an item has regions: the same L1 / L2 over
  the pixels outside the union of the boxes only (a pixel is inside when its centre is), and DINO-I of output and
  source with the boxes blanked (the images resized whole to ``crop`` x ``crop``, no centre crop, so the boxes stay
  exact, and the pixels inside the boxes set to the normalisation mean, DINOv2's neutral input), always against the
  source image (the background should not change). An item whose boxes cover the whole image (a sub-instruction
  without a box is a global edit) has no background and is left out of these;
- ``ic`` / ``bc``: the MLLM judge's Instruction Compliance (1-10) and Background Consistency (1-5) of the output
  against the source and the instruction (:func:`mcie.mllm.prompts.judge_prompt`,
  :func:`mcie.mllm.parsing.parse_judge`), normalised to [0, 1] (divided by 10 and 5). A request or answer
  that fails is reported per item and left out of the means.

The metric functions (:func:`l1_distance`, :func:`l2_distance`, :func:`cosine_similarity`) are pure.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mcie.device import resolve_device

if TYPE_CHECKING:
    import torch

    from mcie.config import Settings
    from mcie.model.pipeline import MCIEPipeline

__all__ = [
    "BENCH_FILE",
    "METRICS",
    "ClipImageEncoder",
    "DinoImageEncoder",
    "EditJob",
    "EvalError",
    "EvalReport",
    "MethodResult",
    "SubSpec",
    "background_mask",
    "bench_reference",
    "cosine_similarity",
    "edit_one",
    "evaluate",
    "find_output",
    "judge_edits",
    "l1_distance",
    "l2_distance",
    "load_bench",
    "load_pipeline",
    "mllm_decompose",
    "parse_sub",
    "prepare_image",
    "read_jobs",
    "run_edits",
    "to_unit_array",
]

log = logging.getLogger(__name__)

BENCH_FILE = "bench.jsonl"
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("clip_i", "CLIP-I", True),
    ("dino_i", "DINO-I", True),
    ("l1", "L1", False),
    ("l2", "L2", False),
    ("bg_l1", "BG-L1", False),
    ("bg_l2", "BG-L2", False),
    ("bg_dino_i", "BG-DINO-I", True),
    ("ic", "IC", True),
    ("bc", "BC", True),
)  # (key, label, higher is better)
_BACKGROUND = ("bg_l1", "bg_l2", "bg_dino_i")
_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_OPERATIONS = ("add", "remove", "change")


class EvalError(ValueError):
    """A job file, benchmark or method folder cannot be used; the message names the file (and line)."""


# --------------------------------------------------------------------------------------------------------------
# jobs


@dataclass(frozen=True)
class SubSpec:
    """One given sub-instruction: text, operation (add / remove / change, or None) and normalised box (or None)."""

    text: str
    operation: str | None = None
    box: tuple[float, float, float, float] | None = None

    def as_item(self) -> tuple[str, str | None, tuple[float, float, float, float] | None]:
        return (self.text, self.operation, self.box)


@dataclass(frozen=True)
class EditJob:
    """One image to edit (and, in a benchmark, its ground truth)."""

    id: str
    source: Path
    instruction: str
    sub_instructions: tuple[SubSpec, ...] | None = None
    target: Path | None = None
    seed: int | None = None
    regions: tuple[tuple[float, float, float, float] | None, ...] | None = None

    def edit_regions(self) -> tuple[tuple[float, float, float, float] | None, ...] | None:
        """The edit regions: ``regions`` when given, else the sub-instructions' boxes (None: the whole image);
        None when the item has neither."""
        if self.regions is not None:
            return self.regions
        if self.sub_instructions:
            return tuple(sub.box for sub in self.sub_instructions)
        return None


def _box(value: Any, where: str) -> tuple[float, float, float, float] | None:
    from mcie.model.masks import box_tuple

    if value is None:
        return None
    try:
        return box_tuple(value, where)
    except (TypeError, ValueError) as exc:
        raise EvalError(str(exc)) from None


def parse_sub(text: str) -> SubSpec:
    """``"text"``, ``"text|op"`` or ``"text|op|x0,y0,x1,y1"`` (``op`` may be empty; the box normalised)."""
    parts = text.split("|")
    if len(parts) > 3 or not parts[0].strip():
        raise EvalError(f"--sub {text!r}: expected \"text|operation|x0,y0,x1,y1\" (operation and box optional)")
    operation = parts[1].strip().lower() if len(parts) > 1 and parts[1].strip() else None
    if operation is not None and operation not in _OPERATIONS:
        raise EvalError(f"--sub {text!r}: operation {operation!r} is not one of {', '.join(_OPERATIONS)}")
    box = None
    if len(parts) == 3 and parts[2].strip():
        try:
            numbers = [float(v) for v in parts[2].split(",")]
        except ValueError:
            raise EvalError(f"--sub {text!r}: the box must be four numbers x0,y0,x1,y1") from None
        box = _box(numbers, f"--sub {text!r}: box")
    return SubSpec(parts[0].strip(), operation, box)


def _path(value: Any, base: Path, where: str) -> Path:
    if isinstance(value, Mapping):
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise EvalError(f"{where}: expected a path (string), got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _subs(value: Any, where: str) -> tuple[SubSpec, ...]:
    if not isinstance(value, list):
        raise EvalError(f"{where}: sub_instructions must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        here = f"{where}: sub_instructions[{i}]"
        if not isinstance(item, Mapping):
            raise EvalError(f"{here}: expected an object with text, operation and box")
        text = item.get("text", item.get("instruction"))
        if not isinstance(text, str) or not text.strip():
            raise EvalError(f"{here}.text: expected a non-empty string, got {text!r}")
        operation = item.get("operation")
        if operation is not None and str(operation).lower() not in _OPERATIONS:
            raise EvalError(f"{here}.operation: {operation!r} is not one of {', '.join(_OPERATIONS)}")
        out.append(SubSpec(text.strip(), None if operation is None else str(operation).lower(),
                           _box(item.get("box"), f"{here}.box")))
    return tuple(out)


def read_jobs(path: str | Path, *, require_target: bool = False, check_files: bool = True) -> list[EditJob]:
    """The jobs of a JSONL file (see the module docstring); errors name the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    base = path.parent
    jobs: list[EditJob] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object")
        job_id = record.get("id", record.get("sample_id"))
        job_id = str(job_id) if isinstance(job_id, str | int) and not isinstance(job_id, bool) else None
        if job_id is None or not _ID.match(job_id):
            raise EvalError(f"{where}: id: expected letters, digits, '.', '_' or '-', got {record.get('id')!r}")
        if job_id in seen:
            raise EvalError(f"{where}: id {job_id!r} already used on line {seen[job_id]}")
        seen[job_id] = number
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise EvalError(f"{where}: instruction: expected a non-empty string, got {instruction!r}")
        source = _path(record.get("source", record.get("source_image")), base, f"{where}: source")
        target_value = record.get("target", record.get("target_image"))
        if target_value is None and require_target:
            raise EvalError(f"{where}: target: a benchmark item needs its ground-truth image")
        target = None if target_value is None else _path(target_value, base, f"{where}: target")
        subs = None if record.get("sub_instructions") is None else _subs(record["sub_instructions"], where)
        seed = record.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise EvalError(f"{where}: seed: expected an integer, got {seed!r}")
        if check_files:
            for role, file in (("source", source), ("target", target)):
                if file is not None and not file.is_file():
                    raise EvalError(f"{where}: {role}: {file} not found")
        regions = record.get("regions")
        if regions is not None:
            if not isinstance(regions, list):
                raise EvalError(f"{where}: regions: expected a list of [x0, y0, x1, y1] boxes")
            regions = tuple(_box(box, f"{where}: regions[{i}]") for i, box in enumerate(regions))
        jobs.append(EditJob(job_id, source, instruction.strip(), subs, target, seed, regions))
    if not jobs:
        raise EvalError(f"{path}: no items")
    return jobs


def load_bench(folder: str | Path, *, require_target: bool = False) -> list[EditJob]:
    """The items of ``folder/bench.jsonl`` (with targets, or reference-free; see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"{folder}: benchmark folder not found")
    return read_jobs(folder / BENCH_FILE, require_target=require_target)


def bench_reference(items: Sequence[EditJob], reference: str = "auto") -> str:
    """``"target"`` or ``"source"``: what the image metrics compare against (``auto``: target when every item has one,
    source when none has); a bench with targets on some items only must choose."""
    if reference not in ("auto", "target", "source"):
        raise EvalError(f"reference: expected auto, target or source, got {reference!r}")
    without = [job.id for job in items if job.target is None]
    if reference == "source" or (reference == "auto" and len(without) == len(items)):
        return "source"
    if without:
        hint = "" if reference == "target" else " (or score every item against its source with --reference source)"
        raise EvalError(f"item {without[0]!r}: target: no ground-truth image, but {len(items) - len(without)} "
                        f"other item(s) have one: give every item a target{hint}")
    return "target"


def background_mask(regions: Sequence[tuple[float, float, float, float] | None], size: int) -> np.ndarray:
    """``(size, size)`` bool: the pixels outside every region (a pixel is inside a box when its centre is; a
    ``None`` region is the whole image)."""
    centres = (np.arange(size) + 0.5) / size
    outside = np.ones((size, size), dtype=bool)
    for box in regions:
        if box is None:
            return np.zeros((size, size), dtype=bool)
        x0, y0, x1, y1 = box
        in_x = (centres >= x0) & (centres < x1)
        in_y = (centres >= y0) & (centres < y1)
        outside &= ~(in_y[:, None] & in_x[None, :])
    return outside


# --------------------------------------------------------------------------------------------------------------
# editing


def prepare_image(image: Image.Image, resolution: int | None) -> Image.Image:
    """RGB; with ``resolution``, the shorter side scaled to it; both sides rounded down to multiples of 8."""
    image = image.convert("RGB")
    width, height = image.size
    if resolution:
        scale = resolution / min(width, height)
        width, height = max(8, round(width * scale)), max(8, round(height * scale))
    width, height = max(8, width - width % 8), max(8, height - height % 8)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def mllm_decompose(settings: Settings) -> Callable[[Image.Image, str], Sequence[Any]]:
    """A ``decompose(image, instruction)`` for :class:`MCIEPipeline` through the configured MLLM backend
    (raises :class:`mcie.config.ConfigError` naming ``MCIE_MLLM_BACKEND`` when none is configured)."""
    from mcie.mllm.base import make_backend
    from mcie.mllm.decompose import decompose

    backend = make_backend(settings=settings)

    def run(image: Image.Image, instruction: str) -> Sequence[Any]:
        return decompose(image, instruction, backend).edits

    return run


def load_pipeline(
    base: str | Path,
    weights: str | Path | None = None,
    *,
    vision_checkpoint: str | Path | None = None,
    decompose: Callable[[Image.Image, str], Sequence[Any]] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> MCIEPipeline:
    """MCIE-E1 (``weights``) or plain InstructPix2Pix (no weights) on ``base``; fp16 on CUDA, fp32 elsewhere."""
    import torch

    from mcie.model.pipeline import MCIEPipeline

    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return MCIEPipeline.from_pretrained(base, weights=weights, vision_checkpoint=vision_checkpoint,
                                            decompose=decompose, torch_dtype=dtype, device=device)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise EvalError(f"cannot load the editing model: {exc}") from None


def edit_one(
    pipe: MCIEPipeline,
    job: EditJob,
    *,
    steps: int = 20,
    guidance_scale: float = 7.5,
    image_guidance_scale: float = 1.5,
    seed: int = 0,
    resolution: int | None = 512,
    use_given_subs: bool = True,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """The edited image of one job and the sub-instructions used (``[{"text", "box"}]``); the job's own seed wins."""
    with Image.open(job.source) as opened:
        image = prepare_image(opened, resolution)
    subs = None
    if use_given_subs and job.sub_instructions is not None:
        subs = [s.as_item() for s in job.sub_instructions]
    result = pipe(image, job.instruction, sub_instructions=subs, num_inference_steps=steps,
                  guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                  seed=job.seed if job.seed is not None else seed)
    used = [{"text": text, "box": None if box is None else list(box)} for text, box in result.sub_instructions[0]]
    return result.images[0], used


def run_edits(
    pipe: MCIEPipeline,
    jobs: Sequence[EditJob],
    out_dir: str | Path,
    *,
    steps: int = 20,
    guidance_scale: float = 7.5,
    image_guidance_scale: float = 1.5,
    seed: int = 0,
    resolution: int | None = 512,
    use_given_subs: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Edit every job into ``out_dir/<id>.png`` (existing outputs are kept unless ``overwrite``); returns one record
    per job: id, output path, the (text, box) sub-instructions used, and whether it was skipped.
    ``use_given_subs=False`` ignores the jobs' sub-instructions (so an MCIE-E1 model decomposes through its MLLM)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    iterator: Any = jobs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(jobs, desc="mcie edit", unit="image")
    for job in iterator:
        path = out / f"{job.id}.png"
        if path.exists() and not overwrite:
            records.append({"id": job.id, "output": str(path), "skipped": True})
            continue
        image, used = edit_one(pipe, job, steps=steps, guidance_scale=guidance_scale,
                               image_guidance_scale=image_guidance_scale, seed=seed, resolution=resolution,
                               use_given_subs=use_given_subs)
        image.save(path)
        records.append({"id": job.id, "output": str(path), "skipped": False, "sub_instructions": used})
    return records


# --------------------------------------------------------------------------------------------------------------
# metrics (pure)


def to_unit_array(image: Image.Image, resolution: int) -> np.ndarray:
    """``(resolution, resolution, 3)`` float64 RGB in [0, 1] (bicubic resize)."""
    rgb = image.convert("RGB")
    if rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.float64) / 255.0


def l1_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two equally shaped arrays."""
    if a.shape != b.shape:
        raise ValueError(f"l1_distance: shapes differ, {a.shape} vs {b.shape}")
    return float(np.mean(np.abs(a - b)))


def l2_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference of two equally shaped arrays (MagicBrush's L2)."""
    if a.shape != b.shape:
        raise ValueError(f"l2_distance: shapes differ, {a.shape} vs {b.shape}")
    return float(np.mean((a - b) ** 2))


def cosine_similarity(a: Any, b: Any) -> float:
    """Cosine of two vectors (numpy arrays, tensors or sequences); 0 when either is zero."""
    x = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64).ravel()
    y = np.asarray(b.detach().cpu() if hasattr(b, "detach") else b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"cosine_similarity: shapes differ, {x.shape} vs {y.shape}")
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return 0.0 if norm == 0 else float(np.dot(x, y) / norm)


# --------------------------------------------------------------------------------------------------------------
# embedding models


class ClipImageEncoder:
    """open_clip image embeddings (CLIP-I) from a checkpoint file, folder, Hub id or pretrained tag (mcie.hub)."""

    def __init__(self, model_name: str, checkpoint: str | Path, device: str | None = None) -> None:
        import open_clip
        import torch

        from mcie.hub import resolve_open_clip

        given = str(checkpoint)
        try:
            checkpoint = resolve_open_clip(model_name, checkpoint, "MCIE_CLIP_CHECKPOINT")
        except FileNotFoundError as exc:
            raise EvalError(str(exc)) from None
        self.device = resolve_device(device)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
        except RuntimeError as exc:
            raise EvalError(f"CLIP {model_name} from {checkpoint}: {exc}") from None
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess
        self.name = f"{model_name} ({checkpoint.name if Path(given).exists() else given})"
        self._torch = torch

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised embeddings ``(N, D)`` on the CPU."""
        torch = self._torch
        with torch.no_grad():
            batch = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
            features = self.model.encode_image(batch).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu()


class DinoImageEncoder:
    """DINOv2 CLS embeddings (DINO-I) from a transformers ``Dinov2Model`` folder or Hub id (mcie.hub)."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, path: str | Path, device: str | None = None, crop: int = 224) -> None:
        import torch
        from transformers import Dinov2Model

        from mcie.hub import resolve_folder

        given = str(path)
        try:
            path = resolve_folder(path, "MCIE_DINO_CHECKPOINT", ignore=("*.msgpack", "*.h5", "*.onnx"))
        except FileNotFoundError as exc:
            raise EvalError(str(exc)) from None
        if not (path / "config.json").is_file():
            raise EvalError(f"DINOv2 checkpoint {path}: not a transformers model folder (no config.json)")
        self.device = resolve_device(device)
        self.model = Dinov2Model.from_pretrained(path).eval().to(self.device)
        self.crop = crop
        self.resize = round(crop * 256 / 224)
        self.name = Path(given).name if Path(given).exists() else given
        self._torch = torch

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The preprocessed ``(3, crop, crop)`` input of one image."""
        rgb = image.convert("RGB")
        width, height = rgb.size
        scale = self.resize / min(width, height)
        size = (max(self.crop, round(width * scale)), max(self.crop, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        rgb = rgb.crop((left, top, left + self.crop, top + self.crop))
        array = (np.asarray(rgb, dtype=np.float32) / 255.0 - np.array(self.MEAN, np.float32)) / np.array(
            self.STD, np.float32
        )
        return array.transpose(2, 0, 1)

    def masked_pixels(
        self, image: Image.Image, regions: Sequence[tuple[float, float, float, float] | None]
    ) -> np.ndarray:
        """The whole image resized to ``crop`` x ``crop`` (no crop, so boxes map exactly), normalised, with the
        pixels inside the regions set to 0 (the normalisation mean): the background-only input of BG-DINO-I."""
        rgb = image.convert("RGB").resize((self.crop, self.crop), Image.Resampling.BICUBIC)
        array = (np.asarray(rgb, dtype=np.float32) / 255.0 - np.array(self.MEAN, np.float32)) / np.array(
            self.STD, np.float32
        )
        array = array * background_mask(regions, self.crop)[..., None]
        return array.transpose(2, 0, 1)

    def embed_masked(
        self, images: Sequence[Image.Image], regions: Sequence[Sequence[tuple[float, float, float, float] | None]]
    ) -> torch.Tensor:
        """L2-normalised CLS embeddings of :meth:`masked_pixels` inputs."""
        return self._embed(np.stack([self.masked_pixels(i, r) for i, r in zip(images, regions, strict=True)]))

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised CLS embeddings ``(N, D)`` on the CPU."""
        return self._embed(np.stack([self.pixels(image) for image in images]))

    def _embed(self, pixels: np.ndarray) -> torch.Tensor:
        torch = self._torch
        batch = torch.from_numpy(pixels).to(self.device)
        with torch.no_grad():
            features = self.model(pixel_values=batch.to(self.model.dtype)).pooler_output.float()
        return torch.nn.functional.normalize(features, dim=-1).cpu()


# --------------------------------------------------------------------------------------------------------------
# the judge


def judge_edits(backend: Any, edits: Sequence[tuple[Image.Image, Image.Image, str]]) -> list[tuple[float, float] | str]:
    """The normalised (IC, BC) of each ``(source, edited, instruction)``, or the error text where the request or
    its answer failed. Requests go to ``backend.generate`` in one batch (the backend bounds the concurrency)."""
    from mcie.mllm.parsing import ParseFailure, parse_judge
    from mcie.mllm.prompts import judge_prompt

    prompts = [judge_prompt(source, edited, instruction) for source, edited, instruction in edits]
    responses = backend.generate([prompt.request for prompt in prompts])
    out: list[tuple[float, float] | str] = []
    for response in responses:
        if not response.ok:
            out.append(f"request failed: {response.error}")
            continue
        parsed = parse_judge(response.text)
        if isinstance(parsed, ParseFailure):
            out.append(f"unreadable answer ({parsed.reason}): {response.text[:200]!r}")
        else:
            out.append(parsed.normalized())
    return out


# --------------------------------------------------------------------------------------------------------------
# evaluation


def find_output(folder: Path, item_id: str) -> Path | None:
    for suffix in OUTPUT_SUFFIXES:
        path = folder / f"{item_id}{suffix}"
        if path.is_file():
            return path
    return None


@dataclass
class MethodResult:
    """One method's scores: means and counts per metric, missing outputs, judge failures, per-item values."""

    name: str
    folder: str
    n_items: int
    missing: list[str] = field(default_factory=list)
    means: dict[str, float | None] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    judge_failures: list[dict[str, str]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_evaluated(self) -> int:
        return self.n_items - len(self.missing)

    def summary(self) -> dict[str, Any]:
        return {"folder": self.folder, "n_items": self.n_items, "n_evaluated": self.n_evaluated,
                "missing": self.missing, "metrics": self.means, "counts": self.counts,
                "judge_failures": self.judge_failures}


@dataclass
class EvalReport:
    """Every method's :class:`MethodResult` plus what was measured with what, and against which reference."""

    bench: str
    n_items: int
    resolution: int
    methods: dict[str, MethodResult]
    models: dict[str, str | None]
    notes: list[str] = field(default_factory=list)
    reference: str = "target"

    @property
    def references(self) -> dict[str, str]:
        """What each metric compared the output with."""
        ref = f"{self.reference} image"
        return {"clip_i": ref, "dino_i": ref, "l1": ref, "l2": ref,
                **dict.fromkeys(_BACKGROUND, "source image, outside the union of the boxes"),
                **dict.fromkeys(("ic", "bc"), "MLLM judge (source image + instruction)")}

    def to_dict(self) -> dict[str, Any]:
        return {"bench": self.bench, "n_items": self.n_items, "resolution": self.resolution,
                "reference": self.reference, "references": self.references, "models": self.models,
                "notes": self.notes, "methods": {name: m.summary() for name, m in self.methods.items()}}

    def to_markdown(self) -> str:
        short = {"target image": "target", "source image": "source"}
        refs = {key: short.get(text, "source bg" if key in _BACKGROUND else "judge")
                for key, text in self.references.items()}
        header = ["method", "evaluated", "missing"] + [
            f"{label} {'↑' if up else '↓'} ({refs[key]})" for key, label, up in METRICS
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, method in self.methods.items():
            cells = [name, f"{method.n_evaluated}/{method.n_items}", str(len(method.missing))]
            for key, _, _ in METRICS:
                value = method.means.get(key)
                cells.append("-" if value is None else f"{value:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        mode = "against the targets" if self.reference == "target" else "reference-free, against the source images"
        out = [f"Results on {self.bench} ({self.n_items} items, {mode}; L1/L2 at {self.resolution} x "
               f"{self.resolution}; BG-*: outside the union of the boxes, against the source; IC/BC normalised to "
               "[0, 1])", "", *lines]
        for name, method in self.methods.items():
            if method.missing:
                shown = ", ".join(method.missing[:20]) + (" ..." if len(method.missing) > 20 else "")
                out.append(f"\n{name}: {len(method.missing)} missing output(s): {shown}")
            if method.judge_failures:
                out.append(f"\n{name}: {len(method.judge_failures)} judge failure(s), left out of IC/BC")
        out += [f"\nnote: {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _background_regions(job: EditJob, resolution: int) -> tuple[Any, ...] | None:
    """The item's regions when they leave some background at ``resolution``, else None."""
    regions = job.edit_regions()
    if not regions or not background_mask(regions, resolution).any():
        return None
    return regions


def evaluate(
    items: Sequence[EditJob],
    methods: Mapping[str, str | Path],
    *,
    clip: ClipImageEncoder | None = None,
    dino: DinoImageEncoder | None = None,
    judge: Any = None,
    resolution: int = 512,
    batch_size: int = 16,
    bench: str = "bench",
    progress: bool = False,
    reference: str = "auto",
) -> EvalReport:
    """Score each method's output folder against ``items`` (see the module docstring). ``judge`` is an MLLM
    backend (or None to skip IC/BC); ``clip`` / ``dino`` None skip CLIP-I / DINO-I (and BG-DINO-I); ``reference``
    is ``auto``, ``target`` or ``source`` (:func:`bench_reference`)."""
    if resolution < 1:
        raise EvalError(f"resolution must be positive, got {resolution}")
    mode = bench_reference(items, reference)
    notes = []
    if clip is None:
        notes.append("CLIP-I not measured (no CLIP checkpoint: MCIE_CLIP_CHECKPOINT or --clip-checkpoint)")
    if dino is None:
        notes.append("DINO-I and BG-DINO-I not measured (no DINOv2 checkpoint: --dino-checkpoint)")
    if judge is None:
        notes.append("IC/BC not measured (no MLLM judge)")
    if not any(_background_regions(job, resolution) for job in items):
        notes.append("BG-L1/BG-L2/BG-DINO-I not measured (no item has edit regions leaving some background)")
    ref_cache: dict[str, dict[str, Any]] = {}

    def reference_features(chunk: Sequence[EditJob]) -> None:
        todo = [job for job in chunk if job.id not in ref_cache]
        if not todo:
            return
        images = [_open(job.target if mode == "target" else job.source) for job in todo]  # type: ignore[arg-type]
        clip_e = clip.embed(images) if clip is not None else None
        dino_e = dino.embed(images) if dino is not None else None
        for i, (job, image) in enumerate(zip(todo, images, strict=True)):
            entry: dict[str, Any] = {"pixels": to_unit_array(image, resolution),
                                     "clip": None if clip_e is None else clip_e[i],
                                     "dino": None if dino_e is None else dino_e[i]}
            regions = _background_regions(job, resolution)
            if regions is not None:
                source = image if mode == "source" else _open(job.source)
                entry["regions"] = regions
                entry["bg_mask"] = background_mask(regions, resolution)
                entry["source_pixels"] = entry["pixels"] if mode == "source" else to_unit_array(source, resolution)
                entry["bg_dino"] = None if dino is None else dino.embed_masked([source], [regions])[0]
            ref_cache[job.id] = entry

    results: dict[str, MethodResult] = {}
    for name, folder in methods.items():
        folder = Path(folder)
        if not folder.is_dir():
            raise EvalError(f"method {name}: output folder {folder} not found")
        result = MethodResult(name, str(folder), len(items))
        present: list[tuple[EditJob, Path]] = []
        for job in items:
            path = find_output(folder, job.id)
            if path is None:
                result.missing.append(job.id)
            else:
                present.append((job, path))
        values: dict[str, list[float]] = {key: [] for key, _, _ in METRICS}
        chunks = [present[i : i + batch_size] for i in range(0, len(present), batch_size)]
        iterator: Any = chunks
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(chunks, desc=f"eval {name}", unit="batch")
        for chunk in iterator:
            jobs = [job for job, _ in chunk]
            outputs = [_open(path) for _, path in chunk]
            reference_features(jobs)
            clip_e = clip.embed(outputs) if clip is not None else None
            dino_e = dino.embed(outputs) if dino is not None else None
            masked = [i for i, job in enumerate(jobs) if "regions" in ref_cache[job.id]]
            bg_e = dino.embed_masked([outputs[i] for i in masked], [ref_cache[jobs[i].id]["regions"] for i in masked]) \
                if dino is not None and masked else None
            judged: list[tuple[float, float] | str] | None = None
            if judge is not None:
                judged = judge_edits(judge, [(_open(job.source), output, job.instruction)
                                             for job, output in zip(jobs, outputs, strict=True)])
            for i, (job, output) in enumerate(zip(jobs, outputs, strict=True)):
                row: dict[str, Any] = {"method": name, "id": job.id, "reference": mode}
                cached = ref_cache[job.id]
                pixels = to_unit_array(output, resolution)
                row["l1"] = l1_distance(pixels, cached["pixels"])
                row["l2"] = l2_distance(pixels, cached["pixels"])
                if clip_e is not None:
                    row["clip_i"] = cosine_similarity(clip_e[i], cached["clip"])
                if dino_e is not None:
                    row["dino_i"] = cosine_similarity(dino_e[i], cached["dino"])
                if "regions" in cached:
                    keep = cached["bg_mask"]
                    row["bg_l1"] = l1_distance(pixels[keep], cached["source_pixels"][keep])
                    row["bg_l2"] = l2_distance(pixels[keep], cached["source_pixels"][keep])
                    if bg_e is not None:
                        row["bg_dino_i"] = cosine_similarity(bg_e[masked.index(i)], cached["bg_dino"])
                if judged is not None:
                    verdict = judged[i]
                    if isinstance(verdict, str):
                        result.judge_failures.append({"id": job.id, "error": verdict})
                        row["judge_error"] = verdict
                    else:
                        row["ic"], row["bc"] = verdict
                for key, _, _ in METRICS:
                    if key in row and math.isfinite(row[key]):
                        values[key].append(row[key])
                result.items.append(row)
        result.means = {key: _mean(values[key]) for key, _, _ in METRICS}
        result.counts = {key: len(values[key]) for key, _, _ in METRICS}
        results[name] = result
    models = {"clip": None if clip is None else clip.name, "dino": None if dino is None else dino.name,
              "judge": None if judge is None else str(getattr(judge, "model", judge))}
    return EvalReport(bench, len(items), resolution, results, models, notes, mode)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as exc:
        raise EvalError(f"{path}: cannot read the image ({exc})") from None
