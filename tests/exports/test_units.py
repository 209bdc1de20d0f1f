"""Pure parts of the exports: splits, records, filters, plots, tar headers and manifests."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import UTC, datetime, timedelta, timezone

import pytest
from PIL import Image
from pydantic import ValidationError

from mcie.exports.card import CardStats, bar_chart, plots, render_readme
from mcie.exports.manifest import build_manifest, resolve_hashes, verify_export, write_manifest
from mcie.exports.records import (
    DecisionRow,
    RecordError,
    ReviewRow,
    SampleRows,
    SubRow,
    aggregated_scores,
    build_record,
    record_dict,
    record_window,
)
from mcie.exports.select import ExportFilter
from mcie.exports.splits import instance_unit, split_for
from mcie.exports.writers import FileEntry, tar_member, webdataset_members

SHA = {k: c * 64 for k, c in zip(("src", "t1", "t2", "t3"), "abcd", strict=True)}
IMAGES = {sha: ("PNG", 8, 6) for sha in SHA.values()}


def _rows(first: int = 1, last: int = 3, reviews: tuple[ReviewRow, ...] = ()) -> SampleRows:
    return SampleRows(
        sample_id=7, instance_id=3, dataset="demo", external_id="x", first_turn=first, last_turn=last,
        status="accepted", instruction="do a, b and c", instance_source=SHA["src"],
        turn_results={1: SHA["t1"], 2: SHA["t2"], 3: SHA["t3"]},
        subs=[SubRow(t, f"edit {t}", "add", (0.1, 0.2, 0.3, 0.4) if t != 2 else None, "mllm" if t != 2 else None,
                     0.5 if t != 2 else None) for t in range(first, last + 1)],
        reviews=reviews, decision=DecisionRow("accepted", "lead", None, "lena"),
    )


def test_split_is_by_instance_deterministic_and_near_the_fraction() -> None:
    units = [instance_unit("seed", f"id-{i}") for i in range(20_000)]
    assert all(0 <= u < 1 for u in units)
    share = sum(u < 0.05 for u in units) / len(units)
    assert 0.04 < share < 0.06
    assert split_for("seed", "id-1", 0.05) == split_for("seed", "id-1", 0.05)
    assert split_for("seed", "id-1", 0.0) == "train" and split_for("seed", "id-1", 1.0) == "val"
    # the dataset is part of the key, and raising the fraction only moves instances into val
    assert instance_unit("a", "1") != instance_unit("b", "1")
    small = {i for i in range(2000) if split_for("d", str(i), 0.1) == "val"}
    large = {i for i in range(2000) if split_for("d", str(i), 0.3) == "val"}
    assert small < large
    with pytest.raises(ValueError, match="val_fraction"):
        split_for("d", "1", 1.5)


def test_window_source_is_the_image_before_the_first_turn() -> None:
    assert record_window(_rows(1, 3)) == ((0, SHA["src"]), ((1, SHA["t1"]), (2, SHA["t2"])), (3, SHA["t3"]))
    assert record_window(_rows(2, 3)) == ((1, SHA["t1"]), ((2, SHA["t2"]),), (3, SHA["t3"]))
    broken = _rows(2, 3)
    broken = SampleRows(**{**broken.__dict__, "turn_results": {2: SHA["t2"], 3: SHA["t3"]}})
    with pytest.raises(RecordError, match="sample 7: instance 3 has no turn 1"):
        record_window(broken)


def test_record_hides_identities_unless_asked() -> None:
    reviews = (ReviewRow(True, 4, 5, 1, "alice"), ReviewRow(False, 5, 3, 2, "bob"), ReviewRow(True, 3, 4, 1, "carol"))
    anonymous = build_record(_rows(reviews=reviews), IMAGES, "train")
    assert [r.reviewer for r in anonymous.provenance.reviews] == [None, None, None]
    assert anonymous.provenance.decision is not None and anonymous.provenance.decision.decided_by is None
    assert "alice" not in anonymous.model_dump_json() and "lena" not in anonymous.model_dump_json()
    named = build_record(_rows(reviews=reviews), IMAGES, "val", include_reviewers=True)
    assert [r.reviewer for r in named.provenance.reviews] == ["alice", "bob", "carol"]
    assert named.provenance.decision.decided_by == "lena"
    assert named.provenance.aggregated.model_dump() == {"consistent": True, "quality": 4.0, "complexity": 4.0}
    assert named.sub_instructions[1].box is None and named.sub_instructions[0].box == (0.1, 0.2, 0.3, 0.4)
    assert [i.after_turn for i in named.intermediate_images] == [1, 2]
    with pytest.raises(RecordError, match="has no row in the images table"):
        build_record(_rows(), {}, "train")


def test_aggregation_ties_and_no_reviews() -> None:
    tie = aggregated_scores([ReviewRow(True, 3, 4, 1, "a"), ReviewRow(False, 4, 5, 1, "b")])
    assert tie.model_dump() == {"consistent": None, "quality": 3.5, "complexity": 4.5}
    assert aggregated_scores([]).model_dump() == {"consistent": None, "quality": None, "complexity": None}


def test_record_dict_sets_every_image_path() -> None:
    record = build_record(_rows(), IMAGES, "train")
    paths = {role: f"p/{role}" for role, _ in record.images()}
    data = record_dict(record, paths)
    assert data["source_image"]["path"] == "p/source" and data["target_image"]["path"] == "p/target"
    assert [i["path"] for i in data["intermediate_images"]] == ["p/intermediate_1", "p/intermediate_2"]
    assert data["schema_version"] == 1 and json.dumps(data)


def test_filter_validation_and_thresholds() -> None:
    flt = ExportFilter(reviewers=["bob", "alice", "bob"], decided_after=datetime(2025, 1, 1),
                       decided_before=datetime(2025, 1, 2, 5, tzinfo=timezone(timedelta(hours=5))))
    assert flt.reviewers == ("alice", "bob")
    assert flt.decided_after == datetime(2025, 1, 1, tzinfo=UTC)
    assert flt.decided_before == datetime(2025, 1, 2, tzinfo=UTC)
    assert flt.model_dump(mode="json")["statuses"] == ["accepted"]
    for bad in ({"statuses": []}, {"min_quality": 6}, {"unknown": 1},
                {"decided_after": "2025-02-01T00:00:00Z", "decided_before": "2025-01-01T00:00:00Z"}):
        with pytest.raises(ValidationError):
            ExportFilter.model_validate(bad)
    strict = ExportFilter(min_quality=4, min_complexity=3.5)
    assert strict.keeps_scores(4, 3.5) and not strict.keeps_scores(3.5, 5) and not strict.keeps_scores(None, 5)
    assert ExportFilter().keeps_scores(None, None)


def test_plots_are_deterministic_pngs_without_metadata() -> None:
    first = bar_chart("t", ["a", "b"], {"x": [3, 0], "y": [1, 7]})
    assert first == bar_chart("t", ["a", "b"], {"x": [3, 0], "y": [1, 7]})
    assert first != bar_chart("t", ["a", "b"], {"x": [3, 1], "y": [1, 7]})
    image = Image.open(io.BytesIO(first))
    assert image.format == "PNG" and image.size == (640, 360)
    assert b"tIME" not in first and b"tEXt" not in first and b"iTXt" not in first
    stats = CardStats()
    stats.add(build_record(_rows(reviews=(ReviewRow(True, 4, 5, 1, "a"),)), IMAGES, "train"))
    assert set(plots(stats)) == {"plots/review_scores.png", "plots/sub_instruction_counts.png",
                                 "plots/operations.png", "plots/box_sources.png"}
    card = render_readme(stats, fmt="parquet", schema_version=1, filter_json={}, options={}, db_revision="0001",
                         n_images=None, agreement=None)
    assert card.startswith("---\nconfigs:") and "| train | 1 | 100.0% |" in card
    assert "No exported sample has two" in card
    assert "license:\n- unknown\n---" in card and "accepted" in card


def test_the_card_describes_the_actual_filter_and_each_sources_licence() -> None:
    stats = CardStats()
    stats.add(build_record(_rows(reviews=(ReviewRow(True, 4, 5, 1, "a"),)), IMAGES, "train"))
    dataset = next(iter(stats.datasets))
    stats.licenses = {dataset: {"CC-BY-NC-4.0"}}
    flt = ExportFilter(statuses=("accepted", "needs_adjudication"), min_quality=3.5, datasets=(dataset,))
    card = render_readme(stats, fmt="jsonl", schema_version=1, filter_json=flt.model_dump(mode="json"), options={},
                         db_revision=None, n_images=None, agreement=None)
    assert "license:\n- cc-by-nc-4.0\n---" in card
    assert f"| {dataset} | CC-BY-NC-4.0 |" in card
    assert ("with status `accepted` or `needs_adjudication`, median review quality at least 3.5, "
            f"from `{dataset}`, exported by") in card
    assert "accepted by expert review" not in card


def test_tar_members_have_fixed_headers_and_sorted_names() -> None:
    record = build_record(_rows(), IMAGES, "train")
    members = webdataset_members(record, lambda sample_id, sha: sha.encode())
    names = [name for name, _ in members]
    assert names == sorted(names) == [
        "0000000007.intermediate_001.png", "0000000007.intermediate_002.png", "0000000007.json",
        "0000000007.source.png", "0000000007.target.png",
    ]
    info, _ = tar_member("k.json", b"{}")
    assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)
    assert info.tobuf(tarfile.USTAR_FORMAT) == tar_member("k.json", b"{}")[0].tobuf(tarfile.USTAR_FORMAT)
    data = json.loads(dict(members)["0000000007.json"])
    assert data["source_image"]["path"] == "0000000007.source.png"


def test_manifest_lists_hashes_and_verification_catches_changes(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.bin").write_bytes(b"beta")
    entries = resolve_hashes(tmp_path, [FileEntry("b.bin", None, 4), FileEntry("a.txt", None, 5)])
    assert [e.path for e in entries] == ["a.txt", "b.bin"] and all(e.sha256 for e in entries)
    with pytest.raises(ValueError, match="sha256"):
        build_manifest(fmt="jsonl", schema_version=1, filter_json={}, options={}, counts={"train": 1, "val": 0},
                       split_files={}, files=[FileEntry("x", None, 1)], db_revision=None)
    manifest = build_manifest(fmt="jsonl", schema_version=1, filter_json={}, options={}, counts={"train": 1, "val": 0},
                              split_files={"train": ["a.txt"]}, files=entries, db_revision="0001")
    assert manifest["counts"] == {"total": 1, "train": 1, "val": 0} and manifest["n_files"] == 2
    write_manifest(tmp_path, manifest)
    assert verify_export(tmp_path) == []
    (tmp_path / "a.txt").write_text("alphA")
    assert verify_export(tmp_path) == ["a.txt: content differs from the manifest"]
    assert "no manifest.json" in verify_export(tmp_path / "nowhere")[0]
