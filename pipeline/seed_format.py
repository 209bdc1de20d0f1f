"""The on-disk layout of SEED-Data-Edit Part-3 (multi-turn editing), shared by the demo writer and the reader.

What the layout is, and where that was seen
-------------------------------------------
SEED-Data-Edit Part-3 ships in the Hugging Face dataset ``AILab-CVC/SEED-Data-Edit-Part2-3`` under
``multi_turn_editing/``::

    multi_turn_editing/
        annotations/split_0001.jsonl  split_0002.jsonl  split_0003.jsonl
        images/multi_turn.tar.gz.part-aa ... part-ae    (cat the parts together, then untar)
        images/data/<batch>/Data/<group>/<hash>_edit<k>.jpg   (after extraction)

Evidence (public sources, read while writing this module):

* The dataset's file tree on huggingface.co (``tree/main/multi_turn_editing/annotations`` and ``.../images``)
  lists ``split_0001.jsonl`` .. ``split_0003.jsonl`` and the ``multi_turn.tar.gz.part-*`` pieces; the dataset
  card says to run ``cat multi_turn.tar.gz.part-* > multi_turn.tar.gz`` and unpack it, and that Part-3 holds
  "21K multi-turn rounds with a maximum of 5 rounds".
* Discussion #1 on that dataset ("Data quality issue") quotes the extracted path
  ``multi_turn_editing/images/data/20240407_586P_2211turns/Data/176/67e57abacded420086d0c6a0789fcd04_edit4.jpg``
  next to the key ``instruction_5``: images are JPEG files under ``images/data/`` after extraction.
* A public reward-model training loader (``ADIEEDataset.get_real_data_list``) globs
  ``multi_turn_editing/annotations/split_*.jsonl``, reads one ``json.loads`` object per line, uses the
  keys ``source_image``, ``edit_image_<i>`` and ``instruction_<i>``, and filters on ``source_image`` values
  that start with ``20240330_315P_1323turns/Data/<n>``: the stored paths are relative and begin with the
  batch folder. That loader opens them under ``multi_turn_editing/images/``.
* Two public OmniGen2-based training datasets set ``root_path = ".../multi_turn_editing/images/data"``
  and open ``os.path.join(root_path, data_item["source_image"])`` and ``data_item[f"edit_image_{i}"]``;
  they count turns as the keys starting with ``instruction`` and skip a turn whose ``edit_image_<i>`` is
  ``None`` (they load the files through Hugging Face ``datasets``, which fills the keys missing from shorter
  instances with nulls).
* A Lumina-mGPT-style pre-tokenizer (``seed_multi_turn_pre_tokenize.py``, ``data_root =
  ".../SEED/multi_turn_editing/data"``) computes the number of turns as ``(len(raw_item) - 1) // 3`` and reads
  ``edit_image_<i>``, ``instruction_<i>`` and ``inverse_instruction_<i>``: a record is ``source_image`` plus
  exactly three keys per turn, and a shorter instance simply has fewer keys.

So one JSONL line is::

    {"source_image": "<batch>/Data/<group>/<name>.jpg",
     "instruction_1": "...", "inverse_instruction_1": "...",
     "edit_image_1": "<batch>/Data/<group>/<hash>_edit1.jpg",
     ...  up to turn 5}

with every path relative to the extracted ``images/data`` folder.

Not confirmed (the annotation files themselves could not be opened from here):

* the file name of the *source* image (edits are ``<hash>_edit<k>.jpg``; the source's own name was not seen);
* the order of keys inside a line (nothing depends on it);
* whether paths are relative to ``images/data`` or to ``images`` - the loaders disagree because they extracted
  the archive in different places. The reader therefore looks for each path under the images root and, when it
  is not there, under ``<images root>/data``.

Helpers here are pure: key names, key parsing and validation of one decoded line, the stable external id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

DATASET_NAME = "seed-data-edit"
DATASET_LICENSE = "CC-BY-NC-4.0"  # SEED-Data-Edit's licence (SPDX id), recorded on every instance
ANNOTATIONS_DIR = "annotations"
IMAGES_DIR = "images"
IMAGES_DATA_DIR = "data"  # top folder inside multi_turn.tar.gz
ANNOTATION_GLOB = "*.jsonl"

SOURCE_KEY = "source_image"
ID_KEY = "id"  # not in the real files; honoured when present
INSTRUCTION = "instruction"
INVERSE_INSTRUCTION = "inverse_instruction"
EDIT_IMAGE = "edit_image"
TURN_FIELDS = (INSTRUCTION, INVERSE_INSTRUCTION, EDIT_IMAGE)
MAX_TURNS = 5  # documented maximum; the reader accepts longer instances

_TURN_KEY = re.compile(rf"^({INVERSE_INSTRUCTION}|{INSTRUCTION}|{EDIT_IMAGE})_(-?\d+)$")


def instruction_key(turn: int) -> str:
    """``instruction_<turn>``."""
    return f"{INSTRUCTION}_{turn}"


def inverse_instruction_key(turn: int) -> str:
    """``inverse_instruction_<turn>``."""
    return f"{INVERSE_INSTRUCTION}_{turn}"


def edit_image_key(turn: int) -> str:
    """``edit_image_<turn>``."""
    return f"{EDIT_IMAGE}_{turn}"


def split_file_name(number: int) -> str:
    """Name of the ``number``-th annotation file, ``split_0001.jsonl`` for 1."""
    if number < 1:
        raise ValueError(f"split numbers start at 1, got {number}")
    return f"split_{number:04d}.jsonl"


def edit_image_name(stem: str, turn: int) -> str:
    """File name of the image after ``turn``, as in ``<hash>_edit4.jpg``."""
    return f"{stem}_edit{turn}.jpg"


def parse_turn_key(key: str) -> tuple[str, int] | None:
    """``("instruction", 3)`` for ``instruction_3``; None for keys that are not per-turn keys."""
    match = _TURN_KEY.match(key)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def external_id_from_source(source_image: str) -> str:
    """Stable external id of a SEED instance: its source image path, normalised to forward slashes."""
    text = source_image.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return PurePosixPath(text).as_posix()


def default_images_root(layout_root: Path) -> Path:
    """Images folder of a layout: ``<root>/images/data`` once the archive is extracted, else ``images``."""
    images = layout_root / IMAGES_DIR
    data = images / IMAGES_DATA_DIR
    return data if data.is_dir() else images


def image_candidates(images_root: Path, relative: str) -> tuple[Path, ...]:
    """Where an image path from a line may lie: as given under the root, then under ``<root>/data``."""
    path = Path(relative)
    if path.is_absolute():
        return (path,)
    first = images_root / path
    if images_root.name == IMAGES_DATA_DIR:
        return (first,)
    return (first, images_root / IMAGES_DATA_DIR / path)


@dataclass(frozen=True)
class SeedTurn:
    """One turn of a SEED line: 1-based index, instruction, edited image path, optional inverse."""

    index: int
    instruction: str
    edit_image: str
    inverse_instruction: str | None = None


@dataclass(frozen=True)
class SeedRecord:
    """A validated SEED line: source image path, its turns in order, and keys this module does not know."""

    source_image: str
    turns: tuple[SeedTurn, ...]
    record_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


class SeedRecordError(ValueError):
    """A SEED line breaks the layout; ``reasons`` lists every problem found, in reading order."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__("; ".join(self.reasons))


def build_record(source_image: str, turns: Sequence[SeedTurn]) -> dict[str, Any]:
    """The JSON object of one line: ``source_image``, then per turn: instruction, inverse, image."""
    record: dict[str, Any] = {SOURCE_KEY: source_image}
    for expected, turn in enumerate(turns, start=1):
        if turn.index != expected:
            raise ValueError(f"turns must be numbered 1..n in order; turn {expected} has index {turn.index}")
        record[instruction_key(turn.index)] = turn.instruction
        record[inverse_instruction_key(turn.index)] = turn.inverse_instruction or ""
        record[edit_image_key(turn.index)] = turn.edit_image
    return record


def _text(value: Any, key: str, problems: list[str], *, required: bool) -> str | None:
    if value is None:
        if required:
            problems.append(f"{key} is missing")
        return None
    if not isinstance(value, str):
        problems.append(f"{key} must be a string, got {type(value).__name__}")
        return None
    if not value.strip():
        problems.append(f"{key} is empty")
        return None
    return value


def parse_record(obj: Mapping[str, Any]) -> SeedRecord:
    """Validate one decoded line and return its turns in order, or raise :class:`SeedRecordError`.

    Null values count as absent, so trailing turns filled with nulls (files re-saved through Hugging Face
    ``datasets``) are dropped. A gap (turn 3 absent while turn 4 exists), an empty instruction or a missing
    edited image is an error.
    """
    problems: list[str] = []
    source = _text(obj.get(SOURCE_KEY), SOURCE_KEY, problems, required=True)

    record_id: str | None = None
    raw_id = obj.get(ID_KEY)
    if isinstance(raw_id, bool) or (raw_id is not None and not isinstance(raw_id, str | int)):
        problems.append(f"{ID_KEY} must be a string or an integer, got {type(raw_id).__name__}")
    elif raw_id is not None:
        record_id = str(raw_id).strip() or None
        if record_id is None:
            problems.append(f"{ID_KEY} is empty")

    per_turn: dict[int, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    for key, value in obj.items():
        if key in (SOURCE_KEY, ID_KEY):
            continue
        parsed = parse_turn_key(key)
        if parsed is None:
            extra[key] = value
            continue
        name, index = parsed
        if index < 1:
            problems.append(f"turn numbers start at 1, found {key}")
            continue
        if value is not None:
            per_turn.setdefault(index, {})[name] = value

    present = sorted(i for i, fields in per_turn.items() if INSTRUCTION in fields or EDIT_IMAGE in fields)
    if not present and not problems:
        problems.append(f"no turns: expected {instruction_key(1)} and {edit_image_key(1)}")

    turns: list[SeedTurn] = []
    for index in range(1, (present[-1] if present else 0) + 1):
        if index not in present:
            later = next(i for i in present if i > index)
            problems.append(f"turn {index} is missing but turn {later} exists")
            continue
        fields = per_turn[index]
        instruction = _text(fields.get(INSTRUCTION), instruction_key(index), problems, required=True)
        image = _text(fields.get(EDIT_IMAGE), edit_image_key(index), problems, required=True)
        inverse = fields.get(INVERSE_INSTRUCTION)
        if inverse is not None and not isinstance(inverse, str):
            problems.append(
                f"{inverse_instruction_key(index)} must be a string, got {type(inverse).__name__}"
            )
            inverse = None
        if instruction is not None and image is not None:
            turns.append(SeedTurn(index, instruction.strip(), image, (inverse or "").strip() or None))

    if problems:
        raise SeedRecordError(problems)
    assert source is not None
    return SeedRecord(source_image=source, turns=tuple(turns), record_id=record_id, extra=extra)
