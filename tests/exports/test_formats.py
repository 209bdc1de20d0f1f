"""Round trips: export the small database in each format, read it back with the usual tools, compare with the
database; exports are recorded, byte-identical when repeated, split by instance, and incremental with ``since``."""

from __future__ import annotations

import glob
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image
from sqlalchemy import select

from mcie.db.migrate import current, upgrade
from mcie.db.models import Export, ExportItem, Instance, JobStatus, Sample, SubInstruction, Turn
from mcie.db.session import session_scope
from mcie.exports.api import run_export
from mcie.exports.manifest import verify_export
from tests.exports.builder import Builder, build_small_db


@pytest.fixture
def small(migrated_url, store):
    return build_small_db(migrated_url, store)


def expected(url: str, sample_id: int) -> dict[str, Any]:
    """What the database says a sample's record must hold."""
    with session_scope(url) as session:
        sample = session.get_one(Sample, sample_id)
        instance = session.get_one(Instance, sample.instance_id)
        turns = {t.index: t.result_image for t in session.scalars(select(Turn).where(Turn.instance_id == instance.id))}
        subs = session.scalars(
            select(SubInstruction).where(SubInstruction.sample_id == sample_id).order_by(SubInstruction.turn_index)
        ).all()
        return {
            "dataset": instance.dataset,
            "external_id": instance.external_id,
            "instruction": sample.instruction,
            "source": instance.source_image if sample.first_turn == 1 else turns[sample.first_turn - 1],
            "target": turns[sample.last_turn],
            "intermediates": [turns[t] for t in range(sample.first_turn, sample.last_turn)],
            "subs": [
                (s.turn_index, s.text, str(s.operation),
                 None if s.box_x0 is None else [s.box_x0, s.box_y0, s.box_x1, s.box_y1],
                 None if s.box_source is None else str(s.box_source))
                for s in subs
            ],
        }


def _subs(items) -> list[tuple]:
    return [
        (s["turn_index"], s["text"], s["operation"], None if s["box"] is None else list(s["box"]), s["box_source"])
        for s in items
    ]


def _check_recorded(url: str, result, records: dict[int, dict[str, Any]]) -> None:
    """The exports row and export_items agree with what was written."""
    assert verify_export(result.path) == []
    with session_scope(url) as session:
        row = session.get_one(Export, result.export_id)
        items = {i.sample_id: str(i.split) for i in session.scalars(select(ExportItem).where(
            ExportItem.export_id == result.export_id))}
    assert row.status == JobStatus.done and row.n_samples == len(records) and row.error is None
    assert row.db_revision == current(url) and row.path == str(result.path)
    import hashlib

    assert row.manifest_sha256 == hashlib.sha256((result.path / "manifest.json").read_bytes()).hexdigest()
    assert items == {sid: r["split"] for sid, r in records.items()}
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["counts"]["total"] == len(records) and manifest["db_revision"] == current(url)
    assert not list(result.path.parent.glob(".*.partial"))


def test_jsonl_round_trip(migrated_url, store, small, tmp_path) -> None:
    result = run_export(migrated_url, store, tmp_path / "out", "jsonl", val_fraction=0.5)
    # precise_float: pandas' default JSON float parser is off by one ulp now and then
    frames = [pd.read_json(result.path / f"{s}.jsonl", lines=True, precise_float=True) for s in ("train", "val")]
    assert [len(f) for f in frames] == [result.counts["train"], result.counts["val"]]
    records = {int(r["sample_id"]): r for f in frames for r in f.to_dict("records")}
    assert sorted(records) == sorted(small.accepted)
    used = set()
    for sample_id, record in records.items():
        want = expected(migrated_url, sample_id)
        assert (record["dataset"], record["external_id"], record["instruction"]) == (
            want["dataset"], want["external_id"], want["instruction"])
        assert _subs(record["sub_instructions"]) == want["subs"]
        images = [record["source_image"], *record["intermediate_images"], record["target_image"]]
        assert [i["sha256"] for i in images] == [want["source"], *want["intermediates"], want["target"]]
        for image in images:
            assert image["path"] == f"images/{image['sha256']}.png"
            assert (result.path / image["path"]).read_bytes() == store.get(image["sha256"])
            used.add(image["path"])
        assert all(r["reviewer"] is None for r in record["provenance"]["reviews"])
    # every image once (a1 and b1 share their source image), nothing else in images/
    assert sorted(f"images/{p.name}" for p in (result.path / "images").iterdir()) == sorted(used)
    assert (result.path / "README.md").is_file() and len(list((result.path / "plots").glob("*.png"))) == 4
    card = (result.path / "README.md").read_text()
    header = card.split("---")[1]
    assert "license:\n- cc-by-nc-4.0\n- unknown\n" in header  # seed's licence as ingested; demo stated none
    assert "| seed | CC-BY-NC-4.0 |" in card and "| demo | not stated |" in card
    assert "target image) with status `accepted`, exported by" in card
    _check_recorded(migrated_url, result, records)


def test_parquet_round_trip_and_hugging_face_datasets(migrated_url, store, small, tmp_path) -> None:
    import datasets

    result = run_export(migrated_url, store, tmp_path / "out", "parquet", val_fraction=0.5, shard_size=2)
    train_files = sorted(glob.glob(str(result.path / "train-*.parquet")))
    n_train = result.counts["train"]
    assert [Path(f).name for f in train_files] == [
        f"train-{i:05d}-of-{(n_train + 1) // 2:05d}.parquet" for i in range((n_train + 1) // 2)]
    frame = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(str(result.path / "*.parquet")))])
    records = {int(r["sample_id"]): r for r in frame.to_dict("records")}
    assert sorted(records) == sorted(small.accepted)
    for sample_id, record in records.items():
        want = expected(migrated_url, sample_id)
        assert record["instruction"] == want["instruction"] and _subs(record["sub_instructions"]) == want["subs"]
        assert record["source_image"]["bytes"] == store.get(want["source"])
        assert record["target_image"]["path"] == f"{want['target']}.png"
        assert [i["bytes"] for i in record["intermediate_images"]] == [store.get(s) for s in want["intermediates"]]
        provenance = json.loads(record["provenance"])
        assert provenance["n_reviews"] == len(provenance["reviews"]) >= 1
    loaded = datasets.load_dataset(
        "parquet",
        data_files={"train": train_files, "val": sorted(glob.glob(str(result.path / "val-*.parquet")))},
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert isinstance(loaded["train"].features["source_image"], datasets.Image)
    row = loaded["train"][0]
    assert isinstance(row["source_image"], Image.Image) and row["source_image"].size == (8, 6)
    assert isinstance(row["intermediate_images"][0], Image.Image)
    assert row["sub_instructions"][0]["operation"] in ("add", "remove", "change")
    assert len(loaded["train"]) + len(loaded["val"]) == len(small.accepted)
    _check_recorded(migrated_url, result, records)


def test_webdataset_round_trip(migrated_url, store, small, tmp_path) -> None:
    import webdataset as wds

    result = run_export(migrated_url, store, tmp_path / "out", "webdataset", val_fraction=0.5, shard_size=2)
    shards = sorted(str(p) for p in result.path.glob("*.tar"))
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    records = {}
    for raw in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        record = json.loads(raw["json"])
        want = expected(migrated_url, record["sample_id"])
        assert raw["__key__"] == f"{record['sample_id']:010d}"
        assert raw["source.png"] == store.get(want["source"]) and raw["target.png"] == store.get(want["target"])
        inter = sorted(k for k in raw if k.startswith("intermediate_"))
        assert [raw[k] for k in inter] == [store.get(s) for s in want["intermediates"]]
        assert record["source_image"]["path"] == f"{raw['__key__']}.source.png"
        assert _subs(record["sub_instructions"]) == want["subs"]
        assert Image.open(io.BytesIO(raw["target.png"])).size == (8, 6)
        records[record["sample_id"]] = record
    assert sorted(records) == sorted(small.accepted)
    _check_recorded(migrated_url, result, records)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reexport_of_the_same_state_is_byte_identical(sqlite_url, store, tmp_path) -> None:
    upgrade(sqlite_url)
    build_small_db(sqlite_url, store)
    for fmt in ("jsonl", "parquet", "webdataset"):
        first = run_export(sqlite_url, store, tmp_path / f"{fmt}-1", fmt, val_fraction=0.4, shard_size=2)
        second = run_export(sqlite_url, store, tmp_path / f"{fmt}-2", fmt, val_fraction=0.4, shard_size=2)
        assert first.export_id != second.export_id
        assert first.manifest_sha256 == second.manifest_sha256
        assert _tree(first.path) == _tree(second.path)
    other = run_export(sqlite_url, store, tmp_path / "jsonl-3", "jsonl", val_fraction=0.9, shard_size=2)
    assert other.manifest_sha256 != first.manifest_sha256


def test_windows_of_one_instance_never_straddle_splits(sqlite_url, store, tmp_path) -> None:
    upgrade(sqlite_url)
    with session_scope(sqlite_url) as session:
        b = Builder(session, store)
        for i in range(30):
            inst = b.instance("leak", f"i{i}", 3)
            for first, last in ((1, 2), (2, 3), (1, 3)):
                b.sample(inst, first, last, reviews=(("rita", True, 4, 4),))
    result = run_export(sqlite_url, store, tmp_path / "out", "jsonl", val_fraction=0.3)
    assert result.counts["train"] > 0 and result.counts["val"] > 0
    splits: dict[str, set[str]] = {}
    for split in ("train", "val"):
        for line in (result.path / f"{split}.jsonl").read_text().splitlines():
            splits.setdefault(json.loads(line)["external_id"], set()).add(split)
    assert len(splits) == 30 and all(len(s) == 1 for s in splits.values())
    assert result.counts["val"] % 3 == 0  # whole instances (3 windows each) move together


def test_since_exports_only_new_acceptances_and_reviewers_on_request(sqlite_url, store, tmp_path) -> None:
    upgrade(sqlite_url)
    small = build_small_db(sqlite_url, store)
    first = run_export(sqlite_url, store, tmp_path / "v1", "jsonl")
    with session_scope(sqlite_url) as session:
        b = Builder(session, store)
        inst = b.instance("demo", "late", 2)
        from mcie.db.models import utcnow

        new_id = b.sample(inst, 1, 2, reviews=(("alice", True, 5, 5),), decided_at=utcnow())
    second = run_export(sqlite_url, store, tmp_path / "v2", "jsonl", since=first.export_id, val_fraction=0,
                        include_reviewers=True)
    lines = [json.loads(x) for x in (second.path / "train.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in lines] == [new_id] and second.n_samples == 1
    assert [r["reviewer"] for r in lines[0]["provenance"]["reviews"]] == ["alice"]
    assert len(small.accepted) == first.n_samples
    with session_scope(sqlite_url) as session:
        assert session.get_one(Export, second.export_id).since_export_id == first.export_id
    third = run_export(sqlite_url, store, tmp_path / "v3", "jsonl", since=second.export_id)
    assert third.n_samples == 0 and (third.path / "train.jsonl").read_text() == ""
