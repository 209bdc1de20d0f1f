"""The MCIE-E1 data loader reads JSONL and WebDataset exports into the same tensors, and collates with padding."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mcie.db.migrate import upgrade
from mcie.exports.api import run_export
from mcie.model.data import ExportDataError, JsonlEditDataset, collate_edit_batch, webdataset_pipeline
from tests.exports.builder import build_small_db, png

EVERY_STATUS = {"statuses": ["accepted", "rejected", "in_review", "needs_adjudication"]}
RESOLUTION = 16


@pytest.fixture
def exported(sqlite_url, store, tmp_path) -> dict[str, Path]:
    upgrade(sqlite_url)
    build_small_db(sqlite_url, store)
    return {
        fmt: run_export(sqlite_url, store, tmp_path / fmt, fmt, EVERY_STATUS, val_fraction=0, shard_size=3).path
        for fmt in ("jsonl", "webdataset")
    }


def _seed_color(store, sha: str) -> torch.Tensor:
    """The solid colour of a builder PNG (its pixel (4, 3), away from the marked corner) in [-1, 1]."""
    import io

    pixel = Image.open(io.BytesIO(store.get(sha))).convert("RGB").getpixel((4, 3))
    return torch.tensor(pixel, dtype=torch.float32) / 127.5 - 1


def test_jsonl_dataset_yields_model_ready_samples(exported, store) -> None:
    dataset = JsonlEditDataset(exported["jsonl"], "train", RESOLUTION)
    assert len(dataset) == 8
    lengths = set()
    for index in range(len(dataset)):
        sample, record = dataset[index], dataset.record(index)
        assert sample["sample_id"] == record["sample_id"] and sample["instruction"] == record["instruction"]
        for key, role in (("source", "source_image"), ("target", "target_image")):
            image = sample[key]
            assert image.shape == (3, RESOLUTION, RESOLUTION) and image.dtype == torch.float32
            assert image.min() >= -1 and image.max() <= 1
            centre = image[:, RESOLUTION // 2, RESOLUTION // 2]
            assert torch.allclose(centre, _seed_color(store, record[role]["sha256"]), atol=1e-6)
        subs = record["sub_instructions"]
        lengths.add(len(subs))
        assert sample["sub_instructions"] == [s["text"] for s in subs]
        assert sample["operations"].tolist() == [{"add": 0, "remove": 1, "change": 2}[s["operation"]] for s in subs]
        assert sample["box_mask"].tolist() == [s["box"] is not None for s in subs]
        for box, sub in zip(sample["boxes"].tolist(), subs, strict=True):
            assert box == pytest.approx(sub["box"] or [0, 0, 1, 1])
    assert lengths == {2, 3, 4}
    assert len(JsonlEditDataset(exported["jsonl"], "train", RESOLUTION, max_sub_instructions=2)[7]["boxes"]) == 2


def test_collate_pads_sub_instructions_with_a_mask(exported) -> None:
    dataset = JsonlEditDataset(exported["jsonl"], "train", RESOLUTION)
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collate_edit_batch(samples)
    n = max(len(s["sub_instructions"]) for s in samples)
    assert batch["source"].shape == (8, 3, RESOLUTION, RESOLUTION) and batch["boxes"].shape == (8, n, 4)
    assert batch["sub_mask"].sum(1).tolist() == [len(s["sub_instructions"]) for s in samples]
    short = next(i for i, s in enumerate(samples) if len(s["sub_instructions"]) < n)
    k = len(samples[short]["sub_instructions"])
    assert batch["operations"][short, k:].eq(-1).all() and not batch["box_mask"][short, k:].any()
    assert batch["sub_instructions"][short][k:] == [""] * (n - k)
    assert batch["sample_id"].tolist() == [s["sample_id"] for s in samples]
    with pytest.raises(ValueError, match="empty batch"):
        collate_edit_batch([])


def test_webdataset_pipeline_matches_the_jsonl_dataset(exported) -> None:
    jsonl = {s["sample_id"]: s for s in JsonlEditDataset(exported["jsonl"], "train", RESOLUTION)}
    shards = sorted(glob.glob(str(exported["webdataset"] / "train-*.tar")))
    assert len(shards) == 3
    streamed = list(webdataset_pipeline(shards, RESOLUTION))
    assert [s["sample_id"] for s in streamed] == sorted(jsonl)
    for sample in streamed:
        other = jsonl[sample["sample_id"]]
        assert torch.equal(sample["source"], other["source"]) and torch.equal(sample["target"], other["target"])
        assert torch.equal(sample["boxes"], other["boxes"]) and sample["sub_instructions"] == other["sub_instructions"]
    loader = DataLoader(webdataset_pipeline(shards, RESOLUTION, shuffle_buffer=4, seed=1), batch_size=3,
                        collate_fn=collate_edit_batch)
    batches = list(loader)
    assert sorted(i for b in batches for i in b["sample_id"].tolist()) == sorted(jsonl)


def test_loader_errors_name_the_file(exported, tmp_path) -> None:
    with pytest.raises(ExportDataError, match=r"val2\.jsonl: no such file \(a JSONL export has train\.jsonl, val"):
        JsonlEditDataset(exported["jsonl"], "val2")
    dataset = JsonlEditDataset(exported["jsonl"], "train", RESOLUTION)
    path = exported["jsonl"] / dataset.record(0)["target_image"]["path"]
    path.unlink()
    with pytest.raises(ExportDataError, match=rf"train\.jsonl: record 0: cannot read .*{path.name}"):
        dataset[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text('{"sample_id": 1, "source_image": {"path": "a.png"}}\n')
    (broken / "a.png").write_bytes(png(1))
    with pytest.raises(ExportDataError, match=r"record 0: the record has no target_image\.path"):
        JsonlEditDataset(broken, "train", RESOLUTION)[0]
