"""The MCIE-E1 data loader: exports (``mcie export``) as torch datasets of source/target pairs with boxes.

Two readers yield the same sample dict:

* :class:`JsonlEditDataset` - a map-style dataset over a JSONL export folder (``<split>.jsonl`` + ``images/``); it
  keeps only the byte offsets of the lines in memory and reads a record when asked for it;
* :func:`webdataset_pipeline` - an ``IterableDataset`` over WebDataset tar shards (split across nodes and workers).

A sample is ``{"sample_id": int, "source": FloatTensor[3, R, R], "target": FloatTensor[3, R, R], "instruction": str,
"sub_instructions": list[str], "operations": LongTensor[n] (add 0, remove 1, change 2), "boxes": FloatTensor[n, 4],
"box_mask": BoolTensor[n]}``. Images are RGB, resized to ``resolution`` x ``resolution`` (bicubic; the aspect ratio
is not kept, so the normalized ``[x0, y0, x1, y1]`` boxes stay exact) and scaled to [-1, 1]. A sub-instruction
without a box gets the whole image ``[0, 0, 1, 1]`` and ``box_mask`` False. :func:`collate_edit_batch` pads the
variable number of sub-instructions of a batch and adds ``sub_mask``.
"""

from __future__ import annotations

import io
import json
from array import array
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

OPERATION_IDS: dict[str, int] = {"add": 0, "remove": 1, "change": 2}
PAD_OPERATION = -1
FULL_BOX = (0.0, 0.0, 1.0, 1.0)

Sample = dict[str, Any]


class ExportDataError(ValueError):
    """An export file or record the loader cannot use; the message names the file (and line or member)."""


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """An RGB image as a float tensor [3, resolution, resolution] in [-1, 1]."""
    rgb = image.convert("RGB")
    if rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array_ = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array_).permute(2, 0, 1).contiguous()


def sub_instruction_tensors(subs: Sequence[dict[str, Any]], where: str) -> dict[str, Any]:
    """Texts, operation ids, boxes (whole image when missing) and the has-box mask of a record's sub-instructions."""
    texts, operations, boxes, mask = [], [], [], []
    for i, sub in enumerate(subs):
        try:
            operations.append(OPERATION_IDS[sub["operation"]])
            texts.append(str(sub["text"]))
            box = sub.get("box")
        except KeyError as exc:
            raise ExportDataError(f"{where}: sub_instructions[{i}] has no valid {exc}") from None
        if box is None:
            boxes.append(FULL_BOX)
            mask.append(False)
        else:
            if len(box) != 4:
                raise ExportDataError(f"{where}: sub_instructions[{i}].box must be [x0, y0, x1, y1]; got {box!r}")
            boxes.append(tuple(float(v) for v in box))
            mask.append(True)
    return {
        "sub_instructions": texts,
        "operations": torch.tensor(operations, dtype=torch.long),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "box_mask": torch.tensor(mask, dtype=torch.bool),
    }


def make_sample(record: dict[str, Any], source: Image.Image, target: Image.Image, resolution: int, where: str,
                max_sub_instructions: int | None = None) -> Sample:
    """The training sample of one exported record and its two decoded images."""
    subs = record.get("sub_instructions") or []
    if max_sub_instructions is not None:
        subs = subs[:max_sub_instructions]
    try:
        sample_id, instruction = int(record["sample_id"]), str(record["instruction"])
    except KeyError as exc:
        raise ExportDataError(f"{where}: the record has no {exc}") from None
    return {
        "sample_id": sample_id,
        "source": image_tensor(source, resolution),
        "target": image_tensor(target, resolution),
        "instruction": instruction,
        **sub_instruction_tensors(subs, where),
    }


def _open_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ExportDataError(f"{where}: cannot decode the image ({exc})") from None
    return image


class JsonlEditDataset(Dataset[Sample]):
    """The samples of ``<folder>/<split>.jsonl`` with their images under ``<folder>/images``."""

    def __init__(self, folder: str | Path, split: str = "train", resolution: int = 512, *,
                 max_sub_instructions: int | None = None) -> None:
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8; got {resolution}")
        self.folder = Path(folder)
        self.path = self.folder / f"{split}.jsonl"
        if not self.path.is_file():
            found = sorted(p.name for p in self.folder.glob("*.jsonl")) if self.folder.is_dir() else []
            raise ExportDataError(f"{self.path}: no such file (a JSONL export has {', '.join(found) or 'none here'})")
        self.split = split
        self.resolution = resolution
        self.max_sub_instructions = max_sub_instructions
        self._offsets = array("q")
        with self.path.open("rb") as handle:
            offset = 0
            for line in handle:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def record(self, index: int) -> dict[str, Any]:
        """The raw record (dict) of line ``index``."""
        with self.path.open("rb") as handle:
            handle.seek(self._offsets[index])
            line = handle.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExportDataError(f"{self.path}: record {index}: not valid JSON ({exc})") from None

    def _image(self, record: dict[str, Any], role: str, where: str) -> Image.Image:
        try:
            rel = record[role]["path"]
        except (KeyError, TypeError):
            raise ExportDataError(f"{where}: the record has no {role}.path") from None
        path = self.folder / rel
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ExportDataError(f"{where}: cannot read {path} ({exc.strerror or exc})") from None
        return _open_image(data, f"{where}: {path}")

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        where = f"{self.path}: record {index}"
        record = self.record(index)
        source = self._image(record, "source_image", where)
        target = self._image(record, "target_image", where)
        return make_sample(record, source, target, self.resolution, where, self.max_sub_instructions)


def _member(sample: dict[str, Any], role: str, where: str) -> bytes:
    for key, value in sample.items():
        if key.startswith(f"{role}.") and key.count(".") == 1:
            return value
    raise ExportDataError(f"{where}: no {role}.<ext> member")


def webdataset_sample(sample: dict[str, Any], resolution: int, max_sub_instructions: int | None = None) -> Sample:
    """The training sample of one raw WebDataset sample (``{"__key__", "json", "source.png", ...}``)."""
    where = f"{sample.get('__url__', '<tar>')}: {sample.get('__key__', '?')}"
    try:
        record = json.loads(sample["json"])
    except KeyError:
        raise ExportDataError(f"{where}: no .json member") from None
    except json.JSONDecodeError as exc:
        raise ExportDataError(f"{where}.json: not valid JSON ({exc})") from None
    source = _open_image(_member(sample, "source", where), f"{where} source")
    target = _open_image(_member(sample, "target", where), f"{where} target")
    return make_sample(record, source, target, resolution, where, max_sub_instructions)


def webdataset_pipeline(
    urls: str | Sequence[str],
    resolution: int = 512,
    *,
    shuffle_buffer: int = 0,
    shuffle_shards: bool = False,
    max_sub_instructions: int | None = None,
    seed: int = 0,
    handler: Callable[[Exception], bool] | None = None,
) -> IterableDataset[Sample]:
    """An ``IterableDataset`` of samples from WebDataset shards (brace patterns and lists of paths/URLs work).

    Shards are split across distributed nodes and dataloader workers; ``shuffle_buffer`` > 0 shuffles samples in a
    buffer of that size and ``shuffle_shards`` shuffles the shard order (both seeded by ``seed``).
    """
    import webdataset as wds

    shard_list = urls if isinstance(urls, str) else list(urls)
    dataset = wds.WebDataset(
        shard_list,
        shardshuffle=shuffle_shards,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,
        seed=seed,
        handler=handler or wds.reraise_exception,
    )
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    return dataset.map(partial(webdataset_sample, resolution=resolution, max_sub_instructions=max_sub_instructions))


def collate_edit_batch(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack a batch, padding sub-instructions to the batch's longest list (at least one slot).

    Adds ``sub_mask`` [B, N] (True for real sub-instructions); padded slots have operation -1, the full box and
    ``box_mask`` False, and text "".
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    n = max([len(s["sub_instructions"]) for s in samples] + [1])
    b = len(samples)
    operations = torch.full((b, n), PAD_OPERATION, dtype=torch.long)
    boxes = torch.tensor(FULL_BOX, dtype=torch.float32).repeat(b, n, 1)
    box_mask = torch.zeros((b, n), dtype=torch.bool)
    sub_mask = torch.zeros((b, n), dtype=torch.bool)
    texts = []
    for i, sample in enumerate(samples):
        k = len(sample["sub_instructions"])
        operations[i, :k] = sample["operations"]
        boxes[i, :k] = sample["boxes"]
        box_mask[i, :k] = sample["box_mask"]
        sub_mask[i, :k] = True
        texts.append(list(sample["sub_instructions"]) + [""] * (n - k))
    return {
        "sample_id": torch.tensor([s["sample_id"] for s in samples], dtype=torch.long),
        "source": torch.stack([s["source"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
        "instruction": [s["instruction"] for s in samples],
        "sub_instructions": texts,
        "operations": operations,
        "boxes": boxes,
        "box_mask": box_mask,
        "sub_mask": sub_mask,
    }
