"""Tests of the ingest readers: SEED-Data-Edit multi-turn JSONL (hand-built fixtures in the exact layout
and the demo output) and the generic JSONL manifest, including every bad-record case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mcie.demo import build_demo
from mcie.pipeline import seed_format as sf
from mcie.pipeline.sources import RawInstance, RecordError, read_jsonl_manifest, read_seed_data_edit


def _image(path: Path, shade: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (shade, 50, 200)).save(path)


def _seed_line(source: str, turns: int, *, extra: dict | None = None) -> dict:
    stem = source.rsplit(".", 1)[0]
    line: dict = {"source_image": source}
    for i in range(1, turns + 1):
        line[f"instruction_{i}"] = f"edit number {i}"
        line[f"inverse_instruction_{i}"] = f"undo edit {i}"
        line[f"edit_image_{i}"] = f"{stem}_edit{i}.jpg"
    line.update(extra or {})
    return line


def _layout(root: Path, files: dict[str, list[dict | str]]) -> Path:
    """Write a multi_turn_editing folder: annotation files from objects (or raw text lines) and every image
    named in them under images/data."""
    for name, lines in files.items():
        texts = []
        for line in lines:
            if isinstance(line, str):
                texts.append(line)
                continue
            texts.append(json.dumps(line))
            for key, value in line.items():
                if (key == "source_image" or key.startswith("edit_image_")) and isinstance(value, str):
                    _image(root / "images" / "data" / value)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / name).write_text("\n".join(texts) + "\n")
    return root


def _split(records: list[RawInstance | RecordError]) -> tuple[list[RawInstance], list[RecordError]]:
    good = [r for r in records if isinstance(r, RawInstance)]
    bad = [r for r in records if isinstance(r, RecordError)]
    assert len(good) + len(bad) == len(records)
    return good, bad


# --- SEED layout ----------------------------------------------------------------------------------------


def test_reads_the_exact_seed_layout_in_file_order(tmp_path: Path) -> None:
    five = _seed_line("20240407_586P_2211turns/Data/176/67e57abacded420086d0c6a0789fcd04.jpg", 5)
    two = _seed_line("20240330_315P_1323turns/Data/12/aa.jpg", 2, extra={"note": "kept"})
    # Hugging Face `datasets` re-saves shorter instances with null trailing turns.
    padded = _seed_line("20240330_315P_1323turns/Data/13/bb.jpg", 2)
    padded.update({f"{k}_{i}": None for i in (3, 4, 5) for k in sf.TURN_FIELDS})
    root = _layout(
        tmp_path / "multi_turn_editing", {"split_0002.jsonl": [padded], "split_0001.jsonl": [five, two]}
    )

    good, bad = _split(list(read_seed_data_edit(root)))

    assert bad == []
    assert [r.external_id for r in good] == [
        "20240407_586P_2211turns/Data/176/67e57abacded420086d0c6a0789fcd04.jpg",
        "20240330_315P_1323turns/Data/12/aa.jpg",
        "20240330_315P_1323turns/Data/13/bb.jpg",
    ]
    first = good[0]
    assert first.dataset == sf.DATASET_NAME
    assert {r.license for r in good} == {"CC-BY-NC-4.0"}  # SEED-Data-Edit's own licence, recorded at ingest
    assert first.source_file == root / "annotations" / "split_0001.jsonl" and first.line == 1
    assert first.source_image == root / "images" / "data" / five["source_image"]
    assert [t.index for t in first.turns] == [1, 2, 3, 4, 5]
    assert first.turns[3].instruction == "edit number 4"
    assert first.turns[4].image.name == "67e57abacded420086d0c6a0789fcd04_edit5.jpg"
    assert all(t.image.is_file() for r in good for t in r.turns)
    assert first.meta["inverse_instructions"]["2"] == "undo edit 2"
    assert good[1].meta["note"] == "kept"
    assert len(good[2].turns) == 2 and good[2].line == 1


def test_accepts_annotations_folder_single_file_and_either_images_root(tmp_path: Path) -> None:
    root = _layout(tmp_path / "mt", {"split_0001.jsonl": [_seed_line("b/Data/1/x.jpg", 3)]})
    annotations = root / "annotations"
    for given in (root, annotations, annotations / "split_0001.jsonl"):
        good, bad = _split(list(read_seed_data_edit(given)))
        assert bad == [] and len(good) == 1, given
    # Paths may be given relative to images/ (loaders that extracted the archive elsewhere) or images/data.
    for images_root in (root / "images", root / "images" / "data"):
        good, bad = _split(list(read_seed_data_edit(root, images_root)))
        assert bad == [] and good[0].source_image.is_file()


def test_id_key_wins_over_the_derived_id(tmp_path: Path) -> None:
    root = _layout(tmp_path / "mt", {"split_0001.jsonl": [_seed_line("b/Data/1/x.jpg", 2, extra={"id": 77})]})
    (record,) = read_seed_data_edit(root)
    assert isinstance(record, RawInstance) and record.external_id == "77"
    (record,) = read_seed_data_edit(root, license="other")  # the demo's pictures are under other terms
    assert isinstance(record, RawInstance) and record.license == "other"
    assert sf.external_id_from_source(".\\b\\Data\\1\\x.jpg") == "b/Data/1/x.jpg"


def test_every_bad_seed_record_is_reported_with_file_and_line_and_the_run_goes_on(tmp_path: Path) -> None:
    ok = _seed_line("b/Data/1/ok.jpg", 2)
    gap = _seed_line("b/Data/2/gap.jpg", 4)
    del gap["instruction_3"], gap["inverse_instruction_3"], gap["edit_image_3"]
    empty = _seed_line("b/Data/3/empty.jpg", 2)
    empty["instruction_2"] = "   "
    no_image = _seed_line("b/Data/4/noimage.jpg", 2)
    del no_image["edit_image_2"]
    no_turns = {"source_image": "b/Data/5/alone.jpg"}
    no_source = _seed_line("b/Data/6/nosource.jpg", 1)
    del no_source["source_image"]
    wrong_type = _seed_line("b/Data/7/typed.jpg", 1)
    wrong_type["instruction_1"] = 5
    zero = _seed_line("b/Data/8/zero.jpg", 1, extra={"instruction_0": "x"})
    last = _seed_line("b/Data/9/last.jpg", 3)
    lines: list[dict | str] = [
        ok,
        "{not json",
        "[1, 2]",
        gap,
        empty,
        no_image,
        no_turns,
        no_source,
        wrong_type,
        zero,
        "",
        dict(ok),  # the same source image again: duplicate external id
        last,
    ]
    root = _layout(tmp_path / "mt", {"split_0001.jsonl": lines})
    missing = _seed_line("b/Data/10/missing.jpg", 2)
    (root / "annotations" / "split_0002.jsonl").write_text(json.dumps(missing) + "\n")  # images never written

    records = list(read_seed_data_edit(root))
    good, bad = _split(records)

    assert [r.external_id for r in good] == ["b/Data/1/ok.jpg", "b/Data/9/last.jpg"]
    assert good[1].line == 13
    first_file = root / "annotations" / "split_0001.jsonl"
    expected = {
        2: "not valid JSON",
        3: "expected an object, got list",
        4: "turn 3 is missing but turn 4 exists",
        5: "instruction_2 is empty",
        6: "edit_image_2 is missing",
        7: "no turns",
        8: "source_image is missing",
        9: "instruction_1 must be a string, got int",
        10: "turn numbers start at 1, found instruction_0",
        12: "duplicate external id 'b/Data/1/ok.jpg' (first seen at split_0001.jsonl:1)",
    }
    by_line = {e.line: e for e in bad if e.file == first_file}
    assert set(by_line) == set(expected)
    for line, reason in expected.items():
        assert reason in by_line[line].reason, (line, by_line[line].reason)
        assert str(by_line[line]).startswith(f"{first_file}:{line}: ")
    (not_found,) = [e for e in bad if e.file.name == "split_0002.jsonl"]
    assert not_found.line == 1
    assert "image not found: b/Data/10/missing.jpg" in not_found.reason
    assert "image not found: b/Data/10/missing_edit2.jpg" in not_found.reason


def test_missing_or_empty_annotation_paths_fail_loudly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="SEED annotations not found"):
        list(read_seed_data_edit(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.jsonl files"):
        list(read_seed_data_edit(tmp_path / "empty"))


def test_reads_the_demo_output(tmp_path: Path) -> None:
    summary = build_demo(tmp_path / "demo", instances=4, seed=3)
    good, bad = _split(list(read_seed_data_edit(tmp_path / "demo")))
    assert bad == []
    assert len(good) == summary.n_instances
    assert sum(len(r.turns) for r in good) == summary.n_turns
    truth = [json.loads(line) for line in (tmp_path / "demo" / "demo_truth.jsonl").read_text().splitlines()]
    assert [r.external_id for r in good] == [t["external_id"] for t in truth]
    assert [[turn.instruction for turn in r.turns] for r in good] == [
        [turn["instruction"] for turn in t["turns"]] for t in truth
    ]


# --- generic manifest -------------------------------------------------------------------------------------


def test_reads_a_generic_manifest(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "a1.png")
    _image(tmp_path / "imgs" / "a2.png")
    absolute = tmp_path / "elsewhere" / "b.png"
    _image(absolute)
    _image(tmp_path / "imgs" / "b1.png")
    lines = [
        {
            "id": "a",
            "source_image": "imgs/a.png",
            "turns": [
                {"instruction": "add a cat", "image": "imgs/a1.png"},
                {"instruction": " x ", "image": "imgs/a2.png"},
            ],
            "meta": {"split": "train"},
        },
        {
            "id": 7,
            "dataset": "mine",
            "license": "CC-BY-4.0",
            "source_image": str(absolute),
            "turns": [{"instruction": "y", "image": "imgs/b1.png"}],
        },
    ]
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    good, bad = _split(list(read_jsonl_manifest(manifest)))

    assert bad == []
    a, b = good
    assert (a.dataset, a.external_id, a.line, a.meta) == ("edits", "a", 1, {"split": "train"})
    assert a.source_image == tmp_path / "imgs" / "a.png"
    assert [(t.index, t.instruction, t.image.name) for t in a.turns] == [
        (1, "add a cat", "a1.png"),
        (2, "x", "a2.png"),
    ]
    assert (b.dataset, b.external_id, b.source_image) == ("mine", "7", absolute)
    assert (a.license, b.license) == (None, "CC-BY-4.0")  # a manifest states a licence or has none
    a, b = _split(list(read_jsonl_manifest(manifest, license="CC0-1.0")))[0]
    assert (a.license, b.license) == ("CC0-1.0", "CC-BY-4.0")  # --license fills in; the line's own wins
    (manifest.parent / "bad.jsonl").write_text(json.dumps({**lines[1], "license": 4}) + "\n")
    (error,) = read_jsonl_manifest(manifest.parent / "bad.jsonl")
    assert isinstance(error, RecordError) and "license must be a string, got int" in error.reason
    # An explicit images root replaces the manifest's folder.
    good, bad = _split(list(read_jsonl_manifest(manifest, images_root=tmp_path / "nowhere")))
    assert good == [] and all("image not found: imgs/" in e.reason for e in bad)


def test_every_bad_manifest_record_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    _image(tmp_path / "s.png")
    _image(tmp_path / "t.png")
    turn = {"instruction": "make it red", "image": "t.png"}

    def line(**changes: object) -> dict:
        base: dict = {"id": "x", "source_image": "s.png", "turns": [turn]}
        base.update(changes)
        return {k: v for k, v in base.items() if v is not None}

    rows: list[dict | str] = [
        line(id="ok"),
        "nonsense",
        '"a string"',
        line(id=None),
        line(id="no-turns", turns=None),
        line(id="empty-turns", turns=[]),
        line(id="turns-dict", turns={"instruction": "a"}),
        line(id="blank", turns=[{"instruction": "", "image": "t.png"}]),
        line(id="no-image", turns=[{"instruction": "a"}]),
        line(id="gone", turns=[{"instruction": "a", "image": "gone.png"}]),
        line(id="typo", turn=[turn]),
        line(id="meta", meta=[1]),
        line(id="ok"),
        line(id="last"),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")

    good, bad = _split(list(read_jsonl_manifest(manifest)))

    assert [(r.external_id, r.line) for r in good] == [("ok", 1), ("last", 14)]
    expected = {
        2: "not valid JSON",
        3: "expected an object, got str",
        4: "id is missing",
        5: "turns is missing",
        6: "turns is empty: expected at least 1 turn",
        7: "turns must be a list, got dict",
        8: "turns[1].instruction is empty",
        9: "turns[1].image is missing",
        10: "image not found: gone.png",
        11: "unknown key(s) turn",
        12: "meta must be an object, got list",
        13: "duplicate external id 'ok' (first seen at m.jsonl:1)",
    }
    assert {e.line: e.file for e in bad} == dict.fromkeys(expected, manifest)
    for error in bad:
        assert expected[error.line] in error.reason, (error.line, error.reason)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        list(read_jsonl_manifest(tmp_path / "absent.jsonl"))
