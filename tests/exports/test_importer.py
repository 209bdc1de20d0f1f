"""mcie data import: presets on tiny local datasets with the real column layouts, --columns, bad rows, the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mcie.exports.importer import (
    DataImportError,
    import_dataset,
    mask_box,
    operation_of,
    parse_columns,
)
from mcie.exports.manifest import verify_export


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _mask(box_px: tuple[int, int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box_px
    array[y0:y1, x0:x1] = 255
    buffer = io.BytesIO()
    Image.fromarray(array, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _image(data: bytes) -> dict:
    return {"bytes": data, "path": None}


def magicbrush_parquet(folder: Path) -> Path:
    """osunlp/MagicBrush's features: img_id, turn_index (int32), source_img, mask_img, instruction, target_img."""
    import datasets

    features = datasets.Features({
        "img_id": datasets.Value("string"), "turn_index": datasets.Value("int32"),
        "source_img": datasets.Image(), "mask_img": datasets.Image(), "instruction": datasets.Value("string"),
        "target_img": datasets.Image(),
    })
    rows = {
        "img_id": ["242679", "242679", "50993", "77"],
        "turn_index": [1, 2, 1, 1],
        "source_img": [_image(_png((10, 10, 10))), _image(_png((20, 20, 20))), _image(_png((30, 30, 30))),
                       _image(_png((40, 40, 40)))],
        "mask_img": [_image(_mask((4, 8, 20, 24))), _image(_mask((0, 0, 40, 32))), _image(_mask((0, 0, 0, 0))),
                     _image(_mask((1, 1, 2, 2)))],
        "instruction": ["Put a cat on the seat", "make the sky purple", "remove the dog", "add a hat"],
        "target_img": [_image(_png((11, 11, 11))), _image(_png((21, 21, 21))), _image(_png((31, 31, 31))),
                       _image(b"not an image")],
    }
    data = folder / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data / "train-00000-of-00001.parquet"))
    return folder


def omniedit_parquet(folder: Path) -> Path:
    """TIGER-Lab/OmniEdit-Filtered-1.2M's features (edited_prompt_list is a sequence of strings)."""
    import datasets

    features = datasets.Features({
        "omni_edit_id": datasets.Value("string"), "task": datasets.Value("string"), "src_img": datasets.Image(),
        "edited_img": datasets.Image(), "edited_prompt_list": datasets.Sequence(datasets.Value("string")),
        "width": datasets.Value("int64"), "height": datasets.Value("int64"), "sc_score_1": datasets.Value("int64"),
        "sc_score_2": datasets.Value("int64"), "sc_reasoning": datasets.Value("string"),
        "pq_score": datasets.Value("int64"), "pq_reasoning": datasets.Value("string"),
        "o_score": datasets.Value("float64"),
    })
    n = 3
    rows = {
        "omni_edit_id": ["oe-1", "oe-2", "oe-3"], "task": ["removal", "addition", "style"],
        "src_img": [_image(_png((i, 0, 0))) for i in range(n)],
        "edited_img": [_image(_png((0, i, 0))) for i in range(n)],
        "edited_prompt_list": [["Erase the lamp", "Remove the lamp"], ["Add a boat"], ["", "Turn it into a sketch"]],
        "width": [40] * n, "height": [32] * n, "sc_score_1": [9] * n, "sc_score_2": [8] * n,
        "sc_reasoning": ["ok"] * n, "pq_score": [9] * n, "pq_reasoning": ["ok"] * n, "o_score": [8.5] * n,
    }
    data = folder / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data / "train-00000-of-00001.parquet"))
    return folder


def _records(out: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def test_mask_box_and_operation_are_pure() -> None:
    with Image.open(io.BytesIO(_mask((4, 8, 20, 24)))) as mask:
        assert mask_box(mask) == (0.1, 0.25, 0.5, 0.75)
    with Image.open(io.BytesIO(_mask((0, 0, 0, 0)))) as mask:
        assert mask_box(mask) is None
    rgba = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    rgba.paste((0, 0, 0, 255), (2, 3, 5, 7))
    assert mask_box(rgba) == (0.2, 0.3, 0.5, 0.7)  # the alpha channel marks the region when it varies
    assert [operation_of(t) for t in ("Put a cat on it", "removal", "Erase the lamp", "make it blue", "addition")] \
        == ["add", "remove", "remove", "change", "add"]


def test_magicbrush_preset_boxes_from_masks_bad_row_named(tmp_path: Path) -> None:
    from mcie.model.data import JsonlEditDataset, collate_edit_batch

    source = magicbrush_parquet(tmp_path / "mb")
    problems: list[dict] = []
    report = import_dataset(str(source), tmp_path / "out", preset="magicbrush", on_error=problems.append)
    assert (report.rows, report.written, report.n_errors) == (4, 3, 1)
    assert problems == report.errors and problems[0]["row"] == 4 and problems[0]["id"] == "77"
    assert "column 'target_img' (target): not a readable image" in problems[0]["error"]
    out = tmp_path / "out"
    assert verify_export(out) == []
    assert json.loads((out / "import_errors.jsonl").read_text())["row"] == 4
    records = _records(out)
    assert [r["external_id"] for r in records] == ["242679", "242679", "50993"]
    assert records[0]["instance_id"] == records[1]["instance_id"] != records[2]["instance_id"]  # turns share it
    assert (records[0]["first_turn"], records[1]["first_turn"]) == (1, 2)
    first = records[0]["sub_instructions"][0]
    assert first["box"] == [0.1, 0.25, 0.5, 0.75] and first["box_source"] == "human" and first["operation"] == "add"
    assert records[1]["sub_instructions"][0]["box"] == [0.0, 0.0, 1.0, 1.0]
    assert records[2]["sub_instructions"][0]["box"] is None  # empty mask: the whole image
    assert records[2]["sub_instructions"][0]["operation"] == "remove"
    assert records[0]["provenance"]["n_reviews"] == 0 and records[0]["status"] == "imported"
    # mcie train's loader reads the folder unchanged
    dataset = JsonlEditDataset(out, "train", resolution=16)
    batch = collate_edit_batch([dataset[0], dataset[2]])
    assert batch["source"].shape == (2, 3, 16, 16)
    assert batch["boxes"][0, 0].tolist() == pytest.approx([0.1, 0.25, 0.5, 0.75])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["total"] == 3 and manifest["options"]["bad_rows"] == 1


def test_omniedit_preset_to_parquet(tmp_path: Path) -> None:
    import datasets

    source = omniedit_parquet(tmp_path / "oe")
    report = import_dataset(str(source), tmp_path / "out", preset="omniedit", fmt="parquet", val_fraction=0.5)
    assert report.written == 3 and report.n_errors == 0
    out = tmp_path / "out"
    assert verify_export(out) == []
    rows = []
    for split in ("train", "val"):
        files = sorted(str(p) for p in out.glob(f"{split}-*.parquet"))
        rows += list(datasets.load_dataset("parquet", data_files=files, split="train"))
    by_id = {row["external_id"]: row for row in rows}
    assert by_id["oe-1"]["instruction"] == "Erase the lamp"
    assert by_id["oe-3"]["instruction"] == "Turn it into a sketch"  # the first non-empty phrasing
    assert [by_id[k]["sub_instructions"][0]["operation"] for k in ("oe-1", "oe-2", "oe-3")] == \
        ["remove", "add", "change"]
    assert by_id["oe-2"]["sub_instructions"][0]["box"] is None
    assert isinstance(by_id["oe-1"]["source_image"], Image.Image)


def test_columns_on_jsonl_with_image_paths_and_boxes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    lines = []
    for i in range(4):
        (src / "img" / f"{i}_a.png").write_bytes(_png((i, i, i), (100, 50)))
        (src / "img" / f"{i}_b.png").write_bytes(_png((i, 9, i), (100, 50)))
        boxes = [[10, 5, 60, 25], [0.5, 0.5, 1.0, 1.0]] if i != 2 else [[0.5, 0.5, 0.2, 0.9]]
        lines.append({"key": f"k{i}", "before": f"img/{i}_a.png", "after": f"img/{i}_b.png", "text": f"change {i}",
                      "regions": boxes})
    lines[3]["before"] = "img/missing.png"
    (src / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    columns = parse_columns("source=before,target=after,instruction=text,boxes=regions,id=key")
    report = import_dataset(str(src / "edits.jsonl"), tmp_path / "out", columns=columns)
    assert report.written == 2 and [e["row"] for e in report.errors] == [3, 4]
    assert "column 'regions' (boxes)[0]: expected x0 < x1" in report.errors[0]["error"]
    assert "column 'before' (source): cannot read image file" in report.errors[1]["error"]
    subs = _records(tmp_path / "out")[0]["sub_instructions"]
    assert [s["box"] for s in subs] == [[0.1, 0.1, 0.6, 0.5], [0.5, 0.5, 1.0, 1.0]]  # pixels -> normalised
    assert {s["box_source"] for s in subs} == {"truth"}


def test_bad_setups_are_named(tmp_path: Path) -> None:
    source = magicbrush_parquet(tmp_path / "mb")
    expected = r"no column 'edited_img', 'edited_prompt_list', 'omni_edit_id', 'src_img', 'task' \(it has img_id"
    with pytest.raises(DataImportError, match=expected):
        import_dataset(str(source), tmp_path / "a", preset="omniedit")
    with pytest.raises(DataImportError, match="unknown role 'colour'"):
        parse_columns("source=a,target=b,instruction=c,colour=d")
    with pytest.raises(DataImportError, match="target missing"):
        parse_columns("source=a,instruction=c")
    with pytest.raises(DataImportError, match="unknown preset 'got'"):
        import_dataset(str(source), tmp_path / "b", preset="got")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(DataImportError, match="not an empty folder"):
        import_dataset(str(source), tmp_path / "busy", preset="magicbrush")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".*.partial"))


def test_cli_data_import(tmp_path: Path) -> None:
    from mcie.cli import app

    source = magicbrush_parquet(tmp_path / "mb")
    result = CliRunner().invoke(app, ["data", "import", str(source), str(tmp_path / "out"), "--preset",
                                      "magicbrush", "--json", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == 3
    result = CliRunner().invoke(app, ["data", "import", str(source), str(tmp_path / "out2"), "--preset", "magicbrush"])
    assert result.exit_code == 0, result.output
    assert "row 4 (id 77): column 'target_img' (target)" in result.stderr.replace("\n", " ")
    result = CliRunner().invoke(app, ["data", "import", str(source), str(tmp_path / "out3")])
    assert result.exit_code == 2 and "exactly one of --preset and --columns" in result.stderr


def test_image_folder_and_arrow_sources(tmp_path: Path) -> None:
    import datasets

    root = tmp_path / "folder"
    (root / "targets").mkdir(parents=True)
    rows = []
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png((i, 0, 0)))
        (root / "targets" / f"{i}.png").write_bytes(_png((0, i, 0)))
        rows.append({"file_name": f"{i}.png", "target": f"targets/{i}.png", "text": f"make it red {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    columns = parse_columns("source=image,target=target,instruction=text")
    report = import_dataset(str(root), tmp_path / "out", columns=columns)
    assert (report.written, report.n_errors) == (3, 0)
    assert sorted(r["instruction"] for r in _records(tmp_path / "out")) == [f"make it red {i}" for i in range(3)]

    features = datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "t": datasets.Value("string")})
    datasets.Dataset.from_dict({"a": [_image(_png((1, 2, 3)))], "b": [_image(_png((3, 2, 1)))], "t": ["swap"]},
                               features=features).save_to_disk(str(tmp_path / "arrow"))
    columns = parse_columns("source=a,target=b,instruction=t")
    report = import_dataset(str(tmp_path / "arrow"), tmp_path / "out2", columns=columns)
    assert report.written == 1 and verify_export(tmp_path / "out2") == []


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_mcie_train_runs_on_an_import(tmp_path: Path) -> None:
    """Stage 1 on imported data: `mcie train`'s own loop takes the folder as it takes an export."""
    from mcie.model.train import train
    from mcie.model.train_config import TrainConfig
    from tests.model.test_train import tiny_config_data
    from tests.model.tiny import make_tiny_files

    import_dataset(str(magicbrush_parquet(tmp_path / "mb")), tmp_path / "stage1", preset="magicbrush")
    files = make_tiny_files(tmp_path / "tiny")
    data = tiny_config_data(files.base, files.vision, tmp_path / "stage1", tmp_path / "run")
    data["stages"] = [{**data["stages"][0], "steps": 2, "warmup_steps": 0, "batch_size": 2}]
    result = train(TrainConfig.from_data(data), progress=False)
    assert result.finished and result.global_step == 2 and all(np.isfinite(list(result.losses.values())))
