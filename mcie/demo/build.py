"""Building the demo: one instance at a time from one random generator (scenes, local and added edits, deliberate
conflicts, the visible truth of each turn), then the SEED-Data-Edit files and the truth sidecar (:func:`build_demo`)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from mcie.demo.catalogue import (
    CHANGE_THRESHOLD,
    COLOURS,
    DRAWN_THINGS,
    EDIT_WEIGHTS,
    LONG_SIDES,
    OPERATION,
    PASTE_SOURCES,
    PHOTO_NAMES,
    PHOTOS,
    PROTECTED,
    TONES,
    Box,
    PixelBox,
    photo,
)
from mcie.demo.pixels import (
    blur_region,
    brighten,
    changed_pixels,
    cut_patch,
    desaturate,
    draw_thing,
    ellipse_mask,
    global_tone,
    inpaint_remove,
    object_mask,
    paste,
    recolour,
    source_cutout,
)
from mcie.demo.wording import box_area, instruction_text, intersects, inverse_text, to_pixels
from mcie.pipeline import seed_format as sf

TRUTH_FILE = "demo_truth.jsonl"
# The pictures' terms, recorded at ingest instead of SEED-Data-Edit's: scikit-image's astronaut and rocket are public
# domain, cat, coffee and cameraman CC0, the motorcycle is from the Middlebury 2014 stereo benchmark (research use);
# no single SPDX id covers them, hence Hugging Face's "other".
DEMO_LICENSE = "other"
LINES_PER_SPLIT = 20
JPEG_QUALITY = 92
CONFLICT_SHARE = 0.17
MIN_TURNS, MAX_TURNS = 2, 5


# --- building one instance -------------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    box: Box
    edits: frozenset[str]
    source: tuple[str, int] | None = None  # (photo, object index) for catalogue objects
    alpha: np.ndarray | None = None  # scene-sized mask for pasted objects


@dataclass(frozen=True)
class TruthTurn:
    """Ground truth of one turn: what was done, to what, where (normalised box), and the instruction."""

    turn: int
    operation: str
    edit: str
    target: str
    box: Box
    instruction: str
    inverse_instruction: str


@dataclass
class _Scene:
    image: np.ndarray
    targets: list[_Target]
    crop: PixelBox  # of the full photograph
    flip: bool
    protected: list[Box] = field(default_factory=list)
    used: list[tuple[int, Box]] = field(default_factory=list)
    tone_used: bool = False


def _scene(photo_name: str, rng: np.random.Generator) -> _Scene:
    """Crop, maybe mirror and resize a photograph; carry its object boxes along."""
    full = photo(photo_name)
    height, width = full.shape[:2]
    fx, fy = rng.uniform(0.84, 1.0, size=2)
    ox, oy = rng.uniform(0.0, 1.0 - fx), rng.uniform(0.0, 1.0 - fy)
    x0, y0, x1, y1 = to_pixels((ox, oy, ox + fx, oy + fy), width, height)
    crop = (x0 / width, y0 / height, x1 / width, y1 / height)
    flip = bool(rng.random() < 0.5)
    image = full[y0:y1, x0:x1]
    if flip:
        image = image[:, ::-1]
    long_side = int(rng.choice(LONG_SIDES))
    scale = long_side / max(image.shape[:2])
    size = (max(16, round(image.shape[1] * scale)), max(16, round(image.shape[0] * scale)))
    image = np.ascontiguousarray(cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA))
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]

    def transform(box: Box, min_visible: float) -> Box | None:
        clipped = (max(box[0], crop[0]), max(box[1], crop[1]), min(box[2], crop[2]), min(box[3], crop[3]))
        if box_area(clipped) <= 0 or box_area(clipped) < min_visible * box_area(box):
            return None
        nx0, ny0 = (clipped[0] - crop[0]) / cw, (clipped[1] - crop[1]) / ch
        nx1, ny1 = (clipped[2] - crop[0]) / cw, (clipped[3] - crop[1]) / ch
        if flip:
            nx0, nx1 = 1.0 - nx1, 1.0 - nx0
        return (round(nx0, 4), round(ny0, 4), round(nx1, 4), round(ny1, 4))

    targets: list[_Target] = []
    for index, obj in enumerate(PHOTOS[photo_name]):
        box = transform(obj.box, 0.85)
        if box is not None:
            targets.append(_Target(obj.name, box, obj.edits, source=(photo_name, index)))
    protected = [b for b in (transform(p, 0.0) for p in PROTECTED.get(photo_name, ())) if b is not None]
    return _Scene(image, targets, (x0, y0, x1, y1), flip, protected)


def _mask_for(scene: _Scene, target: _Target) -> np.ndarray:
    """The target's mask in scene pixels, zero outside its box."""
    h, w = scene.image.shape[:2]
    if target.alpha is not None:
        return target.alpha
    if target.source is None:
        return ellipse_mask(h, w, to_pixels(target.box, w, h))
    x0, y0, x1, y1 = scene.crop
    mask = object_mask(*target.source)[y0:y1, x0:x1]
    if scene.flip:
        mask = mask[:, ::-1]
    mask = cv2.resize(np.ascontiguousarray(mask), (w, h), interpolation=cv2.INTER_AREA)
    bx0, by0, bx1, by1 = to_pixels(target.box, w, h)
    inside = np.zeros_like(mask)
    inside[by0:by1, bx0:bx1] = 1.0
    return np.clip(mask, 0.0, 1.0) * inside


def visible_box(alpha: np.ndarray, fallback: Box) -> Box:
    """Normalised bounding box of the pixels a soft mask can visibly change; ``fallback`` if there are none.

    This is the true box of a local edit. Every edit blends its result in through the object's mask, and a pixel
    blended at weight ``a`` moves by at most ``255 * a``, so below ``CHANGE_THRESHOLD / 255`` (about 0.12) it can
    never count as edited: the box of ``mask > CHANGE_THRESHOLD / 255`` bounds the object the edit changed. The
    rectangle the edit was placed by is not: a pasted patch keeps transparent margins (a drawn ball a tenth of its
    size on each side, a cut-out the part of its source box GrabCut left out), and the catalogue's hand-drawn
    object boxes are loose around what the mask found (the rocket's sky on both sides, the fuel tank's frame). A
    reviewer or an MLLM boxes the visible object, so that is the truth. (A removal inpaints the mask grown by a
    few pixels to leave no outline; the truth stays the object's own mask.)
    """
    h, w = alpha.shape
    ys, xs = np.nonzero(alpha > CHANGE_THRESHOLD / 255)
    if len(xs) == 0:
        return fallback
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return (round(x0 / w, 4), round(y0 / h, 4), round(x1 / w, 4), round(y1 / h, 4))


def _visible(before: np.ndarray, after: np.ndarray, mask: np.ndarray | None) -> bool:
    changed = changed_pixels(before, after)
    if mask is None:
        return float(np.abs(before.astype(np.int16) - after.astype(np.int16)).mean()) > 12
    region = mask > 0.5
    return int(region.sum()) > 0 and int(changed[region].sum()) >= 0.25 * int(region.sum())


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _free(scene: _Scene, box: Box) -> bool:
    return all(not intersects(box, used, margin=0.01) for _, used in scene.used)


def _try_local(
    scene: _Scene, target: _Target, edit: str, rng: np.random.Generator, avoid_colour: str | None = None
) -> tuple[np.ndarray, dict[str, str]] | None:
    """Apply one edit to a target; None when it would not be visible."""
    mask = _mask_for(scene, target)
    details: dict[str, str] = {}
    h, w = scene.image.shape[:2]
    if edit == "recolour":
        colours = [c for c in COLOURS if c != avoid_colour]
        order = rng.permutation(len(colours))
        for index in order[:3]:
            colour = colours[int(index)]
            after = recolour(scene.image, mask, COLOURS[colour])
            if _visible(scene.image, after, mask):
                return after, {"colour": colour}
        return None
    if edit == "remove":  # grow the mask a little (inside the box) so no outline of the object is left
        x0, y0, x1, y1 = to_pixels(target.box, w, h)
        size = max(3, int(0.08 * min(x1 - x0, y1 - y0)) | 1)
        grown = cv2.dilate((mask > 0.05).astype(np.uint8), np.ones((size, size), np.uint8)).astype(np.float32)
        inside = np.zeros_like(grown)
        inside[y0:y1, x0:x1] = 1.0
        mask = grown * inside
        after = inpaint_remove(scene.image, mask)
    elif edit == "brighten":
        after = brighten(scene.image, mask)
    elif edit == "blur":
        x0, y0, x1, y1 = to_pixels(target.box, w, h)
        after = blur_region(scene.image, mask, max(3.0, min(x1 - x0, y1 - y0) / 8))
    elif edit == "desaturate":
        after = desaturate(scene.image, mask)
    else:
        raise ValueError(f"unknown local edit {edit!r}")
    return (after, details) if _visible(scene.image, after, mask) else None


def _try_add(
    scene: _Scene, photo_name: str, rng: np.random.Generator
) -> tuple[np.ndarray, _Target, str] | None:
    """Paste a drawn or cut-out object at a free spot; returns the image, the new target and its noun."""
    h, w = scene.image.shape[:2]
    make: tuple[str, Any]
    if rng.random() < 0.5:
        choices = [i for i, source in enumerate(PASTE_SOURCES) if source.photo != photo_name]
        index = _pick(rng, choices)
        source = PASTE_SOURCES[index]
        cut_rgb = source_cutout(index)[0]
        aspect = cut_rgb.shape[1] / cut_rgb.shape[0]
        name, noun, make = source.name, source.noun, ("cut", index)
    else:
        kind = _pick(rng, DRAWN_THINGS)
        colour = _pick(rng, tuple(COLOURS)) if kind in ("ball", "star", "balloon") else ""
        aspect = {"ball": 1.0, "star": 1.0, "balloon": 0.7, "cloud": 1.8, "boat": 1.2}[kind]
        name = f"{colour} {kind}".strip()
        article = "an" if name[0] in "aeiou" else "a"
        noun = {"cloud": "a white cloud", "boat": "a small boat"}.get(kind, f"{article} {name}")
        make = ("draw", (kind, colour))
    side = rng.uniform(0.2, 0.32) * min(w, h)
    spot = None
    for attempt in range(80):  # shrink the object every 20 failed spots
        size = side * 0.75 ** (attempt // 20)
        pw = int(np.clip(size * np.sqrt(aspect), 14, w * 0.45))
        ph = int(np.clip(size / np.sqrt(aspect), 14, h * 0.45))
        x0, y0 = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
        candidate = (x0 / w, y0 / h, (x0 + pw) / w, (y0 + ph) / h)
        if _free(scene, candidate) and not any(intersects(candidate, p) for p in scene.protected):
            spot = x0, y0, pw, ph
            break
    if spot is None:
        return None
    x0, y0, pw, ph = spot
    if make[0] == "cut":
        rgb, alpha = cut_patch(make[1], pw, ph)
    else:
        rgb, alpha = draw_thing(make[1][0], make[1][1], pw, ph)
    after = paste(scene.image, rgb, alpha, x0, y0)
    box = (round(x0 / w, 4), round(y0 / h, 4), round((x0 + pw) / w, 4), round((y0 + ph) / h, 4))
    full_alpha = np.zeros((h, w), np.float32)
    full_alpha[y0 : y0 + ph, x0 : x0 + pw] = alpha
    if not _visible(scene.image, after, full_alpha):
        return None
    edits = frozenset({"recolour", "remove", "brighten", "desaturate", "blur"})
    target = _Target(name, box, edits, alpha=full_alpha)
    return after, target, noun


@dataclass
class _Instance:
    photo: str
    images: list[np.ndarray]
    turns: list[TruthTurn]
    conflicts: list[tuple[int, int]]


def _instance(photo_name: str, n_turns: int, conflict: bool, rng: np.random.Generator) -> _Instance:
    """Plan and apply the turns of one instance; a conflict instance edits one region twice."""
    scene = _scene(photo_name, rng)
    images = [scene.image]
    turns: list[TruthTurn] = []
    edited: dict[int, _Target] = {}  # turn -> what it edited (local edits only)
    colours: dict[int, str] = {}
    conflict_at = int(rng.integers(2, n_turns + 1)) if conflict else 0
    first_of_conflict = int(rng.integers(1, conflict_at)) if conflict else 0
    conflicts: list[tuple[int, int]] = []

    for turn in range(1, n_turns + 1):
        result = None
        if turn == conflict_at and first_of_conflict in edited:
            result = _conflicting_edit(scene, edited[first_of_conflict], colours.get(first_of_conflict), rng)
            if result is not None:
                conflicts.append((first_of_conflict, turn))
        if result is None:
            must_be_targetable = turn == first_of_conflict
            result = _fresh_edit(scene, photo_name, rng, targetable=must_be_targetable)
        after, target, edit, details = result
        variant = int(rng.integers(0, 15))
        if edit == "global":
            tone = details["tone"]
            text = TONES[tone][variant % 2]
            text = text[0].upper() + text[1:]
        elif edit == "add":
            text = instruction_text("add", target.name, target.box, noun=details["noun"], variant=variant)
        else:
            colour = details.get("colour", "")
            text = instruction_text(edit, target.name, target.box, colour=colour, variant=variant)
        inverse = inverse_text(edit, target.name, target.box)
        # the truth is the visible extent of what the edit changed, not the rectangle it was placed by (visible_box)
        truth_box = target.box if edit == "global" else visible_box(_mask_for(scene, target), target.box)
        turns.append(TruthTurn(turn, OPERATION[edit], edit, target.name, truth_box, text, inverse))
        if edit != "global":
            scene.used.append((turn, target.box))
            if edit != "remove":
                edited[turn] = target
            if edit == "recolour":
                colours[turn] = details["colour"]
            if edit == "add":
                scene.targets.append(target)
        else:
            scene.tone_used = True
        scene.image = after
        images.append(after)
    return _Instance(photo_name, images, turns, conflicts)


def _conflicting_edit(
    scene: _Scene, target: _Target, colour: str | None, rng: np.random.Generator
) -> tuple[np.ndarray, _Target, str, dict[str, str]] | None:
    """Edit again the region an earlier turn edited: another colour, or remove / brighten / blur it."""
    options = ["recolour"] + [e for e in ("remove", "brighten", "desaturate", "blur") if e in target.edits]
    first = options[0] if rng.random() < 0.5 else _pick(rng, options)
    for edit in [first] + [o for o in options if o != first]:
        applied = _try_local(scene, target, edit, rng, avoid_colour=colour)
        if applied is not None:
            return applied[0], target, edit, applied[1]
    return None


def _fresh_edit(
    scene: _Scene, photo_name: str, rng: np.random.Generator, *, targetable: bool
) -> tuple[np.ndarray, _Target, str, dict[str, str]]:
    """An edit on a region no earlier turn touched; ``targetable`` rules out remove and global edits."""
    kinds = [k for k in EDIT_WEIGHTS if not (targetable and k in ("remove", "global"))]
    for _ in range(40):
        weights = np.array([EDIT_WEIGHTS[k] for k in kinds])
        edit = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        if edit == "global":
            if scene.tone_used:
                continue
            tone = _pick(rng, tuple(TONES))
            after = global_tone(scene.image, tone)
            if _visible(scene.image, after, None):
                return (
                    after,
                    _Target("whole picture", (0.0, 0.0, 1.0, 1.0), frozenset()),
                    "global",
                    {"tone": tone},
                )
            continue
        if edit == "add":
            added = _try_add(scene, photo_name, rng)
            if added is not None:
                return added[0], added[1], "add", {"noun": added[2]}
            continue
        candidates = [
            t
            for t in scene.targets
            if edit in t.edits and _free(scene, t.box) and (edit != "remove" or box_area(t.box) < 0.16)
        ]
        if not candidates:
            continue
        target = _pick(rng, candidates)
        applied = _try_local(scene, target, edit, rng)
        if applied is not None:
            return applied[0], target, edit, applied[1]
    raise RuntimeError(
        f"could not find a visible edit on {photo_name!r}: edited {[b for _, b in scene.used]}"
    )


# --- writing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`build_demo` wrote."""

    out_dir: Path
    n_instances: int
    n_turns: int
    n_conflicts: int
    files: tuple[Path, ...]


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False
    )
    return buffer.getvalue()


def _write(path: Path, data: bytes, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written.append(path)


def _prepare(out_dir: Path, overwrite: bool) -> None:
    ours = [out_dir / sf.ANNOTATIONS_DIR, out_dir / sf.IMAGES_DIR, out_dir / TRUTH_FILE]
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"demo output must be a folder: {out_dir}")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} is not empty; pass overwrite=True to replace a previous demo there"
            )
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def build_demo(out_dir: Path, instances: int = 30, seed: int = 0, *, overwrite: bool = False) -> DemoSummary:
    """Write ``instances`` multi-turn instances in the SEED-Data-Edit Part-3 layout under ``out_dir``.

    Layout: ``annotations/split_000N.jsonl`` (20 lines each), JPEGs under
    ``images/data/demo_seed<seed>/Data/``, ground truth in ``demo_truth.jsonl``. Deterministic in ``seed``.
    ``out_dir`` must be empty or absent unless ``overwrite`` is set, which replaces only those three entries.
    """
    if instances < 1:
        raise ValueError(f"instances must be at least 1, got {instances}")
    out_dir = Path(out_dir)
    _prepare(out_dir, overwrite)
    rng = np.random.default_rng(seed)
    n_conflicts = max(1, round(instances * CONFLICT_SHARE)) if instances >= 3 else 0
    conflict_ids = {int(i) for i in rng.choice(instances, size=n_conflicts, replace=False)}
    batch = f"demo_seed{seed}"
    images_root = out_dir / sf.IMAGES_DIR / sf.IMAGES_DATA_DIR

    written: list[Path] = []
    lines: list[str] = []
    truth_lines: list[str] = []
    total_turns = 0
    total_conflicts = 0
    for index in range(instances):
        instance_rng = np.random.default_rng([seed, index])
        photo_name = PHOTO_NAMES[(index + seed) % len(PHOTO_NAMES)]
        n_turns = int(instance_rng.integers(MIN_TURNS, MAX_TURNS + 1))
        built = _instance(photo_name, n_turns, index in conflict_ids, instance_rng)
        stem = hashlib.sha1(f"mcie-demo:{seed}:{index}".encode()).hexdigest()[:32]
        folder = f"{batch}/Data/{index}"
        source_rel = f"{folder}/{stem}.jpg"
        _write(images_root / source_rel, _jpeg_bytes(built.images[0]), written)
        seed_turns = []
        for truth, image in zip(built.turns, built.images[1:], strict=True):
            rel = f"{folder}/{sf.edit_image_name(stem, truth.turn)}"
            _write(images_root / rel, _jpeg_bytes(image), written)
            seed_turns.append(sf.SeedTurn(truth.turn, truth.instruction, rel, truth.inverse_instruction))
        lines.append(json.dumps(sf.build_record(source_rel, seed_turns), ensure_ascii=False))
        height, width = built.images[0].shape[:2]
        truth_lines.append(
            json.dumps(
                {
                    "dataset": sf.DATASET_NAME,
                    "external_id": sf.external_id_from_source(source_rel),
                    "photo": photo_name,
                    "width": width,
                    "height": height,
                    "turns": [
                        {
                            "turn": t.turn,
                            "operation": t.operation,
                            "edit": t.edit,
                            "target": t.target,
                            "box": list(t.box),
                            "instruction": t.instruction,
                        }
                        for t in built.turns
                    ],
                    "conflicts": [list(pair) for pair in built.conflicts],
                },
                ensure_ascii=False,
            )
        )
        total_turns += len(built.turns)
        total_conflicts += bool(built.conflicts)

    annotations = out_dir / sf.ANNOTATIONS_DIR
    for number, start in enumerate(range(0, len(lines), LINES_PER_SPLIT), start=1):
        chunk = lines[start : start + LINES_PER_SPLIT]
        _write(annotations / sf.split_file_name(number), ("\n".join(chunk) + "\n").encode(), written)
    _write(out_dir / TRUTH_FILE, ("\n".join(truth_lines) + "\n").encode(), written)
    return DemoSummary(out_dir, instances, total_turns, total_conflicts, tuple(sorted(written)))
