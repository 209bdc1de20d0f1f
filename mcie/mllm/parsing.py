"""Robust parsers for the four MLLM answers (conflict, grounding, decomposition, judge).

MLLMs wrap JSON in ```json fences, surround it with prose, write Python literals (single quotes, trailing
commas, True/None), rename keys ("has_conflict", "bbox"), answer "yes"/"no" instead of booleans, give boxes
outside the image or with swapped corners, and stop mid-answer when they hit the token limit. Each parser
returns a typed result whose ``notes`` say what was repaired or dropped, or a :class:`ParseFailure` carrying
the raw text and the reason. Parsers never raise on bad answers and never drop anything without a note.
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
import tokenize
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

Operation = Literal["add", "remove", "change"]
OPERATIONS: tuple[Operation, ...] = ("add", "remove", "change")

MAX_JSON_STARTS = 200  # candidate '{' / '[' positions tried per answer (answers are short)


# ---------------------------------------------------------------------------------------------------------
# results


class _Result:
    ok: ClassVar[bool] = True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the result (for the ``parsed`` column of mllm_judgements)."""
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ParseFailure(_Result):
    """An answer that could not be understood: the raw text and why."""

    raw: str
    reason: str
    ok: ClassVar[bool] = False


@dataclass(frozen=True)
class ConflictVerdict(_Result):
    """Whether merging the turns into one instruction conflicts, which turns (1-based) and why."""

    conflict: bool
    turns: tuple[int, ...]
    reason: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PixelBox(_Result):
    """A pixel box (x0 <= x1, y0 <= y1) in the frame the answer was parsed against, with its label."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class GroundingAnswer(_Result):
    """The candidate boxes of one turn's edited region, best first."""

    boxes: tuple[PixelBox, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParsedEdit(_Result):
    """One sub-instruction of a decomposed complex instruction; ``box`` is None when the answer had none."""

    instruction: str
    operation: Operation
    box: PixelBox | None


@dataclass(frozen=True)
class Decomposition(_Result):
    """A complex instruction split into sub-edits, in the instruction's order."""

    edits: tuple[ParsedEdit, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class JudgeScores(_Result):
    """Instruction Compliance (1-10) and Background Consistency (1-5) of one edited image."""

    instruction_compliance: int
    background_consistency: int
    reason: str
    notes: tuple[str, ...] = ()

    def normalized(self) -> tuple[float, float]:
        """Both scores divided by their maximum (10 and 5), the [0, 1] form reported in the paper's tables."""
        return self.instruction_compliance / 10.0, self.background_consistency / 5.0


@dataclass(frozen=True)
class Extracted:
    """A JSON value found in an answer and the repairs that were needed to read it."""

    value: Any
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------
# JSON extraction

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)(```|\Z)", re.S)
_JSON_NAMES = {"true": "True", "false": "False", "null": "None"}
_CLOSER = {"{": "}", "[": "]"}
_NOTE_PROSE = "ignored text around the JSON"
_NOTE_SYNTAX = "repaired non-JSON syntax (single quotes, trailing commas or Python literals)"
_NOTE_TRUNCATED = "the answer was cut off; kept its complete part"


def extract_json(text: str) -> Extracted | ParseFailure:
    """The JSON object or list in an MLLM answer: fenced or bare, with prose around it, repaired if needed."""
    if not isinstance(text, str):
        return ParseFailure(repr(text), f"expected the answer as text, got {type(text).__name__}")
    if not text.strip():
        return ParseFailure(text, "empty answer")
    candidates: list[tuple[str, tuple[str, ...]]] = []
    for match in _FENCE.finditer(text):
        body = match.group(1)
        if body.strip():
            candidates.append((body, () if match.group(2) else (_NOTE_TRUNCATED,)))
    candidates.append((text, ()))
    for candidate, fence_notes in candidates:
        found = _decode(candidate.strip())
        if found is not None:
            notes = tuple(dict.fromkeys(fence_notes + found.notes))
            return Extracted(found.value, notes)
    return ParseFailure(text, "no JSON object or list found in the answer")


def _decode(text: str) -> Extracted | None:
    """The widest JSON container in ``text``: read as JSON, else as a Python-style literal, else as a
    cut-off value closed after its last complete element."""
    try:
        value = json.loads(text)
    except ValueError:
        pass
    else:
        if isinstance(value, dict | list):
            return Extracted(value)
    best: tuple[Any, int, int, tuple[str, ...]] | None = None
    covered_until = -1
    for start in [m.start() for m in re.finditer(r"[\[{]", text)][:MAX_JSON_STARTS]:
        if start < covered_until:
            continue  # inside a value already read
        found = _read_at(text, start)
        if found is None:
            continue
        value, end, notes = found
        covered_until = end
        if best is None or end - start > best[2] - best[1]:
            best = (value, start, end, notes)
    if best is None:
        return None
    value, start, end, notes = best
    outside = (text[:start] + text[end:]).strip()
    return Extracted(value, (*notes, _NOTE_PROSE) if outside else notes)


def _read_at(text: str, start: int) -> tuple[Any, int, tuple[str, ...]] | None:
    """(value, end, repair notes) of the container starting at ``start``, or None."""
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        pass
    else:
        return (value, end, ()) if isinstance(value, dict | list) else None
    end = _balanced_end(text, start)
    if end is not None:
        value = _python_literal(text[start:end])
        return None if value is None else (value, end, (_NOTE_SYNTAX,))
    closed = _close_truncated(text, start)
    if closed is None:
        return None
    value = _loads_or_literal(closed)
    return None if value is None else (value, len(text), (_NOTE_TRUNCATED,))


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the bracket closing the one at ``start`` (strings in either quote skipped)."""
    stack: list[str] = []
    quote: str | None = None
    escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in _CLOSER:
            stack.append(_CLOSER[char])
        elif char in "]}":
            if not stack or stack.pop() != char:
                return None
            if not stack:
                return index + 1
    return None


def _close_truncated(text: str, start: int) -> str | None:
    """A cut-off JSON value closed after its last complete element (a cut-off string value is kept up to
    where it stops; a cut-off number or key is dropped), or None."""
    stack: list[str] = []
    after_colon: list[bool] = []  # per open container: inside an object, has the current key got its ':'
    quote: str | None = None
    escaped = False
    cut: tuple[int, tuple[str, ...]] | None = None
    string_is_value = False
    for index in range(start, len(text)):
        char = text[index]
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
                is_value = stack and (stack[-1] == "]" or after_colon[-1])
                if is_value:
                    cut = (index + 1, tuple(stack))
        elif char in "\"'":
            quote = char
            string_is_value = bool(stack) and (stack[-1] == "]" or after_colon[-1])
        elif char in _CLOSER:
            stack.append(_CLOSER[char])
            after_colon.append(False)
        elif char in "]}":
            if not stack or stack.pop() != char:
                return None
            after_colon.pop()
            if not stack:
                return None  # complete, not truncated
            cut = (index + 1, tuple(stack))
        elif char == ":" and stack:
            after_colon[-1] = True
        elif char == "," and stack:
            cut = (index, tuple(stack))
            after_colon[-1] = False
    if quote is not None and string_is_value:  # keep a cut-off text value, closed where it stops
        body = text[start:-1] if escaped else text[start:]
        return body + quote + "".join(reversed(stack))
    if cut is None:
        return None
    end, open_closers = cut
    return text[start:end].rstrip().rstrip(",") + "".join(reversed(open_closers))


def _loads_or_literal(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        value = _python_literal(text)
    return value if isinstance(value, dict | list) else None


def _python_literal(text: str) -> Any:
    """``text`` read as a Python literal with JSON's true/false/null accepted; None if it is not one."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    chars = list(text)
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.NAME and token.string in _JSON_NAMES:
                offset = line_starts[token.start[0] - 1] + token.start[1]
                chars[offset : offset + len(token.string)] = _JSON_NAMES[token.string]
        value = ast.literal_eval("".join(chars))
    except (tokenize.TokenError, SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    value = _plain(value)
    return value if isinstance(value, dict | list) else None


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively; anything JSON cannot hold (sets, bytes, complex) becomes None."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return None


# ---------------------------------------------------------------------------------------------------------
# value coercion helpers


def _keyed(mapping: dict[str, Any]) -> dict[str, Any]:
    """Keys normalized: lower case, runs of other characters as one underscore ("Score (1-10)" ->
    "score_1_10")."""
    return {re.sub(r"[^a-z0-9]+", "_", str(k).lower()).strip("_"): v for k, v in mapping.items()}


def _pick(mapping: dict[str, Any], names: tuple[str, ...], *, prefix: bool = False) -> tuple[str, Any] | None:
    """The first of ``names`` present; with ``prefix``, else the first key starting with a name + "_"."""
    for name in names:
        if name in mapping:
            return name, mapping[name]
    if prefix:
        for name in names:
            for key, value in mapping.items():
                if key.startswith(name + "_"):
                    return key, value
    return None


_TRUE_WORDS = {"yes", "y", "true", "t", "1", "conflict", "has conflict", "conflicting"}
_FALSE_WORDS = {"no", "n", "false", "f", "0", "none", "no conflict", "not conflicting"}


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        words = re.sub(r"[^\w\s]", " ", value).lower().split()
        phrase = " ".join(words)
        if phrase in _TRUE_WORDS:
            return True
        if phrase in _FALSE_WORDS:
            return False
        if words and words[0] in ("yes", "true"):  # "Yes, turns 1 and 3 both edit the cup"
            return True
        if words and words[0] in ("no", "false"):
            return False
    return None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _ints_in(value: Any) -> list[int] | None:
    """Turn numbers from 3, "3", "turn 3", [1, "3"], "1 and 3", [{"turn": 2}]; None if not turn-like."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        return [int(value)] if value.is_integer() else None
    if isinstance(value, str):
        return [int(n) for n in re.findall(r"-?\d+", value)]
    if isinstance(value, list):
        out: list[int] = []
        for item in value:
            if isinstance(item, dict):
                item = _keyed(item)
                found = _pick(item, ("turn", "turns", "index", "id"))
                item = found[1] if found else None
            numbers = _ints_in(item)
            if numbers is None:
                return None
            out.extend(numbers)
        return out
    return None


def _first_dict(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]
    return None


# ---------------------------------------------------------------------------------------------------------
# conflict

_CONFLICT_KEYS = (
    "conflict", "has_conflict", "is_conflict", "conflict_exists", "conflicting", "has_conflicts",
    "conflicts", "answer", "verdict",
)
_TURN_KEYS = (
    "turns", "conflict_turns", "conflicting_turns", "turn_ids", "turn_indices", "turn_numbers",
    "involved_turns", "turn",
)
_REASON_KEYS = ("reason", "reasoning", "explanation", "rationale", "why", "analysis", "comment")
_PLAIN_YES_NO = re.compile(r"\s*(yes|no|true|false)\b[\s.!]*", re.I)


def parse_conflict(text: str, n_turns: int | None = None) -> ConflictVerdict | ParseFailure:
    """The conflict verdict in ``text``; with ``n_turns``, turn numbers outside 1..n_turns are dropped."""
    extracted = extract_json(text)
    if isinstance(extracted, ParseFailure):
        plain = _PLAIN_YES_NO.fullmatch(text or "")
        if plain is None:
            return extracted
        verdict = plain.group(1).lower() in ("yes", "true")
        return ConflictVerdict(verdict, (), "", ("the answer was a bare yes/no, not JSON",))
    notes = list(extracted.notes)
    mapping = _first_dict(extracted.value)
    if mapping is None:
        return ParseFailure(text, f"expected a JSON object, got {type(extracted.value).__name__}")
    mapping = _keyed(mapping)
    found = _pick(mapping, _CONFLICT_KEYS)
    if found is None:
        return ParseFailure(text, f"no 'conflict' field (keys: {', '.join(mapping) or 'none'})")
    key, raw_flag = found
    turns_value: Any = None
    if isinstance(raw_flag, list):  # "conflicts": [{"turns": [1, 2], "reason": ...}, ...]
        conflict: bool | None = bool(raw_flag)
        turns_value = [t for item in raw_flag for t in (_ints_in(_turns_of(item)) or [])]
        first = _keyed(raw_flag[0]) if raw_flag and isinstance(raw_flag[0], dict) else {}
        if "reason" not in mapping and (inner := _pick(first, _REASON_KEYS)) is not None:
            mapping["reason"] = inner[1]
    else:
        conflict = _as_bool(raw_flag)
    if conflict is None:
        return ParseFailure(text, f"field '{key}': expected true/false or yes/no, got {raw_flag!r}")
    if key != "conflict":
        notes.append(f"read the verdict from '{key}'")
    if turns_value is None:
        picked = _pick(mapping, _TURN_KEYS)
        turns_value = picked[1] if picked else []
    turns = _ints_in(turns_value) if turns_value is not None else []
    if turns is None:
        notes.append(f"ignored unreadable turns {turns_value!r}")
        turns = []
    if n_turns is not None:
        bad = [t for t in turns if not 1 <= t <= n_turns]
        if bad:
            notes.append(f"dropped turn numbers outside 1..{n_turns}: {bad}")
            turns = [t for t in turns if 1 <= t <= n_turns]
    if not conflict and turns:
        notes.append(f"no conflict, so ignored the listed turns {turns}")
        turns = []
    reason_found = _pick(mapping, _REASON_KEYS)
    reason = "" if reason_found is None or reason_found[1] is None else str(reason_found[1]).strip()
    if not reason:
        notes.append("no reason given")
    return ConflictVerdict(conflict, tuple(dict.fromkeys(turns)), reason, tuple(notes))


def _turns_of(item: Any) -> Any:
    if isinstance(item, dict):
        found = _pick(_keyed(item), _TURN_KEYS)
        return found[1] if found else None
    return item


# ---------------------------------------------------------------------------------------------------------
# boxes and grounding

_BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d", "bbox2d", "bounding_box", "coordinates", "coords", "region")
_LABEL_KEYS = ("label", "name", "object", "category", "description", "text")
_BOX_LIST_KEYS = (
    "boxes", "candidates", "bboxes", "bounding_boxes", "results", "objects", "regions", "detections",
    "predictions", "answer",
)


def _coords(raw: Any) -> tuple[float, float, float, float] | None:
    """Four numbers from [x0, y0, x1, y1], [[x0, y0], [x1, y1]], "x0, y0, x1, y1" or an xmin/ymin dict."""
    if isinstance(raw, str):
        raw = re.findall(r"-?\d+(?:\.\d+)?", raw)
    if isinstance(raw, dict):
        keyed = _keyed(raw)
        for names in (("x0", "y0", "x1", "y1"), ("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax")):
            if all(n in keyed for n in names):
                raw = [keyed[n] for n in names]
                break
        else:
            return None
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(p, list) and len(p) == 2 for p in raw):
        raw = [*raw[0], *raw[1]]
    if not isinstance(raw, list) or len(raw) != 4:
        return None
    numbers = [_as_number(v) for v in raw]
    if any(n is None for n in numbers):
        return None
    x0, y0, x1, y1 = (float(n) for n in numbers)  # type: ignore[arg-type]
    return x0, y0, x1, y1


def clean_box(
    coords: tuple[float, float, float, float],
    width: float,
    height: float,
    *,
    label: str | None = None,
    min_size: float = 1.0,
    name: str = "box",
) -> tuple[PixelBox | None, list[str]]:
    """A box put in order (corners swapped if reversed), clipped to width x height, or None when degenerate.

    Returns the box (or None) and notes saying what was changed.
    """
    notes: list[str] = []
    x0, y0, x1, y1 = coords
    if x0 > x1:
        x0, x1 = x1, x0
        notes.append(f"{name}: swapped x0 > x1")
    if y0 > y1:
        y0, y1 = y1, y0
        notes.append(f"{name}: swapped y0 > y1")
    width, height = float(width), float(height)
    clipped = (
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    )
    cx0, cy0, cx1, cy1 = clipped
    if cx1 - cx0 < min_size or cy1 - cy0 < min_size:
        notes = [f"{name}: dropped {list(coords)}, degenerate or outside the {width:g}x{height:g} image"]
        return None, notes
    if clipped != (x0, y0, x1, y1):
        notes.append(f"{name}: clipped {[x0, y0, x1, y1]} to the {width:g}x{height:g} image")
    return PixelBox(cx0, cy0, cx1, cy1, label), notes


def _box_entries(value: Any, notes: list[str]) -> list[tuple[Any, str | None]] | None:
    """(raw coordinates, label) of every box-like entry in a parsed answer; None if there is no box shape."""
    if isinstance(value, dict):
        keyed = _keyed(value)
        found = _pick(keyed, _BOX_KEYS)
        if found is not None:
            return [(found[1], _label(keyed))]
        listed = _pick(keyed, _BOX_LIST_KEYS)
        if listed is not None and isinstance(listed[1], list | dict):
            return _box_entries(listed[1], notes)
        if _coords(value) is not None:
            return [(value, None)]
        return None
    if not isinstance(value, list):
        return None
    if _coords(value) is not None:
        return [(value, None)]  # a bare [x0, y0, x1, y1]
    entries: list[tuple[Any, str | None]] = []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            keyed = _keyed(item)
            found = _pick(keyed, _BOX_KEYS)
            if found is not None:
                entries.append((found[1], _label(keyed)))
                continue
            if _coords(item) is not None:
                entries.append((item, _label(keyed)))
                continue
        elif _coords(item) is not None:
            entries.append((item, None))
            continue
        notes.append(f"item {index + 1}: skipped, no box in {_short(item)}")
    return entries or None


def _names_no_box(value: Any) -> bool:
    """Whether a parsed answer is an explicit empty list of boxes: ``[]`` or ``{"boxes": []}`` (any box-list key)."""
    if isinstance(value, list):
        return not value
    if not isinstance(value, dict):
        return False
    keyed = _keyed(value)
    listed = _pick(keyed, _BOX_LIST_KEYS)
    return listed is not None and listed[1] == [] and _pick(keyed, _BOX_KEYS) is None


def _label(keyed: dict[str, Any]) -> str | None:
    found = _pick(keyed, _LABEL_KEYS)
    if found is None or found[1] is None or isinstance(found[1], dict | list):
        return None
    return str(found[1]).strip() or None


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_grounding(
    text: str, width: float, height: float, *, k: int | None = None, min_size: float = 1.0
) -> GroundingAnswer | ParseFailure:
    """Candidate boxes in ``text``, in the answer's pixel frame of ``width`` x ``height`` (best first).

    Accepts Qwen2.5-VL lists ``[{"bbox_2d": [x0, y0, x1, y1], "label": ...}]``, ``{"boxes": [...]}``, a bare
    ``[x0, y0, x1, y1]``, lists of such lists and point pairs. Boxes are ordered, clipped, and dropped with a
    note when degenerate; at most ``k`` are kept. An empty list (``[]``, ``{"boxes": []}``) is a valid answer,
    "nothing to ground": a :class:`GroundingAnswer` without boxes, not a failure (an empty or blank *text* is).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"parse_grounding: expected a positive frame size, got {width}x{height}")
    extracted = extract_json(text)
    if isinstance(extracted, ParseFailure):
        return extracted
    notes = list(extracted.notes)
    if _names_no_box(extracted.value):
        return GroundingAnswer((), (*notes, "the answer names no box"))
    entries = _box_entries(extracted.value, notes)
    if not entries:
        detail = f" ({'; '.join(notes)})" if notes else ""
        return ParseFailure(text, f"no box found: expected [{{\"bbox_2d\": [x0, y0, x1, y1]}}, ...]{detail}")
    boxes: list[PixelBox] = []
    for index, (raw, label) in enumerate(entries):
        coords = _coords(raw)
        if coords is None:
            notes.append(f"box {index + 1}: skipped, expected 4 numbers, got {_short(raw)}")
            continue
        name = f"box {index + 1}"
        box, box_notes = clean_box(coords, width, height, label=label, min_size=min_size, name=name)
        notes.extend(box_notes)
        if box is not None:
            boxes.append(box)
    if not boxes:
        return ParseFailure(text, "no usable box: " + "; ".join(notes))
    if k is not None and len(boxes) > k:
        notes.append(f"kept the first {k} of {len(boxes)} boxes")
        boxes = boxes[:k]
    return GroundingAnswer(tuple(boxes), tuple(notes))


# ---------------------------------------------------------------------------------------------------------
# decomposition

_EDIT_LIST_KEYS = (
    "edits", "sub_instructions", "subinstructions", "sub_edits", "instructions", "steps", "decomposition",
    "operations", "results",
)
_INSTRUCTION_KEYS = (
    "instruction", "sub_instruction", "subinstruction", "text", "edit", "description", "prompt",
)
_OPERATION_KEYS = ("operation", "op", "type", "action", "edit_type", "operation_type")
_OPERATION_WORDS: dict[str, Operation] = {
    **dict.fromkeys(("add", "insert", "put", "place", "draw", "include", "addition"), "add"),
    **dict.fromkeys(("remove", "delete", "erase", "eliminate", "take", "removal", "get"), "remove"),
    **dict.fromkeys(
        ("change", "replace", "modify", "edit", "alter", "turn", "make", "recolor", "color", "colour"),
        "change",
    ),
    **dict.fromkeys(("transform", "convert", "swap", "paint", "adjust", "update", "set"), "change"),
}


def _operation(value: Any) -> Operation | None:
    if not isinstance(value, str):
        return None
    words = re.findall(r"[a-z]+", value.lower())
    return _OPERATION_WORDS.get(words[0]) if words else None


def parse_decomposition(
    text: str, width: float, height: float, *, min_size: float = 1.0
) -> Decomposition | ParseFailure:
    """Sub-edits (instruction, add/remove/change, box in the ``width`` x ``height`` frame) in ``text``.

    A missing operation is inferred from the sub-instruction's first verb (noted); a missing or unusable box
    leaves ``box`` None (noted); an item without an instruction or operation is dropped (noted).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"parse_decomposition: expected a positive frame size, got {width}x{height}")
    extracted = extract_json(text)
    if isinstance(extracted, ParseFailure):
        return extracted
    notes = list(extracted.notes)
    value = extracted.value
    if isinstance(value, dict):
        keyed = _keyed(value)
        listed = _pick(keyed, _EDIT_LIST_KEYS)
        if listed is not None and isinstance(listed[1], list):
            value = listed[1]
        elif _pick(keyed, _INSTRUCTION_KEYS) is not None:
            value = [value]
        else:
            return ParseFailure(text, f"expected {{\"edits\": [...]}}, got keys {', '.join(keyed) or 'none'}")
    if not isinstance(value, list):
        return ParseFailure(text, f"expected a list of edits, got {type(value).__name__}")
    edits: list[ParsedEdit] = []
    for index, item in enumerate(value, start=1):
        edit = _sub_edit(item, index, width, height, min_size, notes)
        if edit is not None:
            edits.append(edit)
    if not edits:
        return ParseFailure(text, "no usable sub-edit: " + ("; ".join(notes) or "the list is empty"))
    return Decomposition(tuple(edits), tuple(notes))


def _sub_edit(
    item: Any, index: int, width: float, height: float, min_size: float, notes: list[str]
) -> ParsedEdit | None:
    keyed = _keyed(item) if isinstance(item, dict) else {"instruction": item}
    found = _pick(keyed, _INSTRUCTION_KEYS)
    instruction = str(found[1]).strip() if found and isinstance(found[1], str | int | float) else ""
    if not instruction:
        notes.append(f"edit {index}: dropped, no sub-instruction in {_short(item)}")
        return None
    op_found = _pick(keyed, _OPERATION_KEYS)
    operation = _operation(op_found[1]) if op_found else None
    if operation is None:
        operation = _operation(instruction)
        if operation is None:
            got = repr(op_found[1]) if op_found else "none"
            notes.append(f"edit {index}: dropped, operation {got} is not add/remove/change")
            return None
        notes.append(f"edit {index}: operation inferred from the instruction as {operation!r}")
    box_found = _pick(keyed, _BOX_KEYS)
    box: PixelBox | None = None
    coords = _coords(box_found[1]) if box_found else None
    if coords is None:
        notes.append(f"edit {index}: no usable box" + (f" in {_short(box_found[1])}" if box_found else ""))
    else:
        box, box_notes = clean_box(coords, width, height, min_size=min_size, name=f"edit {index} box")
        notes.extend(box_notes)
    return ParsedEdit(instruction, operation, box)


# ---------------------------------------------------------------------------------------------------------
# judge

_IC_KEYS = (
    "instruction_compliance", "ic", "compliance", "instruction_following", "instruction_score",
    "instruction_compliance_score",
)
_BC_KEYS = (
    "background_consistency", "bc", "consistency", "background", "background_score",
    "background_consistency_score",
)


def _score(value: Any, top: int) -> tuple[int | None, str | None]:
    """An integer score in 1..top from 8, 7.5, "8", "8/10", "8 out of 10"; with a note when rounded."""
    if isinstance(value, dict):
        found = _pick(_keyed(value), ("score", "value", "rating"))
        value = found[1] if found else None
    if isinstance(value, str):
        match = re.search(r"-?\d+(?:\.\d+)?", value)
        value = match.group(0) if match else None
    number = _as_number(value)
    if number is None:
        return None, None
    rounded = math.floor(number + 0.5)
    if not 1 <= rounded <= top:
        return None, None
    return rounded, (f"rounded {number:g} to {rounded}" if rounded != number else None)


def parse_judge(text: str) -> JudgeScores | ParseFailure:
    """Instruction Compliance (1-10), Background Consistency (1-5) and the reason in ``text``."""
    extracted = extract_json(text)
    if isinstance(extracted, ParseFailure):
        return extracted
    notes = list(extracted.notes)
    mapping = _first_dict(extracted.value)
    if mapping is None:
        return ParseFailure(text, f"expected a JSON object, got {type(extracted.value).__name__}")
    keyed = _keyed(mapping)
    for nested in ("scores", "score", "evaluation", "ratings"):
        if isinstance(keyed.get(nested), dict):
            keyed = {**_keyed(keyed[nested]), **{k: v for k, v in keyed.items() if k != nested}}
    scores: list[int] = []
    fields = ((_IC_KEYS, 10, "instruction_compliance"), (_BC_KEYS, 5, "background_consistency"))
    for keys, top, field_name in fields:
        found = _pick(keyed, keys, prefix=True)
        if found is None:
            return ParseFailure(text, f"no '{field_name}' field (keys: {', '.join(keyed) or 'none'})")
        score, note = _score(found[1], top)
        if score is None:
            return ParseFailure(text, f"field '{found[0]}': expected a score 1-{top}, got {found[1]!r}")
        if note:
            notes.append(f"{field_name}: {note}")
        scores.append(score)
    reason_found = _pick(keyed, _REASON_KEYS)
    reason = "" if reason_found is None or reason_found[1] is None else str(reason_found[1]).strip()
    return JudgeScores(scores[0], scores[1], reason, tuple(notes))
