"""The pipeline end to end on the demo data: ingest -> expand -> (MLLM conflict filter) -> grounding -> load.

The MLLM is a local OpenAI-compatible server (tests/mcie/mllm/chat_server.py) that answers like a good grounding
model from the demo's ground truth; everything else (database, image store, scorers, stages) is real.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mcie.config import get_settings
from mcie.db.models import BoxCandidate, Instance, MllmJudgement, Sample, SampleStatus, SubInstruction, Turn
from mcie.db.session import session_scope
from mcie.demo import build_demo
from mcie.geometry import Box
from tests.cli import cli
from tests.mcie.mllm.chat_server import chat_server


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    out = tmp_path / "demo"
    build_demo(out, instances=8, seed=3)
    return out


def truth(demo: Path) -> dict[str, dict]:
    return {d["external_id"]: d for d in map(json.loads, (demo / "demo_truth.jsonl").read_text().splitlines())}


def counts(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model))
            for model in (Instance, Turn, Sample, SubInstruction, BoxCandidate, MllmJudgement)
        }


def chosen_boxes(url: str) -> dict[tuple[str, int], Box]:
    with session_scope(url) as session:
        rows = session.execute(
            select(Instance.external_id, Turn.index, BoxCandidate)
            .join(Turn, Turn.instance_id == Instance.id)
            .join(BoxCandidate, BoxCandidate.turn_id == Turn.id)
            .where(BoxCandidate.chosen)
        ).all()
        return {(ext, idx): Box(c.box_x0, c.box_y0, c.box_x1, c.box_y1) for ext, idx, c in rows}


def mean_iou(url: str, demo: Path) -> float:
    truths = truth(demo)
    ious = [Box(*truths[ext]["turns"][idx - 1]["box"]).iou(box) for (ext, idx), box in chosen_boxes(url).items()]
    return sum(ious) / len(ious)


def test_demo_without_mllm_gives_review_ready_samples_with_boxes(demo: Path) -> None:
    url = get_settings().database_url
    code, out, _ = cli("pipeline", "ingest", str(demo), "--format", "seed-data-edit")
    assert code == 0, out
    assert "ingested 8 instances" in out
    with session_scope(url) as session:  # the SEED layout's licence unless --license says otherwise
        assert set(session.scalars(select(Instance.license))) == {"CC-BY-NC-4.0"}
    code, out, _ = cli("pipeline", "run", "--mllm", "none", "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["scorer"] == "pixel"
    assert any("MLLM stages skipped" in note for note in summary["notes"])
    with session_scope(url) as session:
        statuses = set(session.scalars(select(Sample.status)))
        assert statuses == {SampleStatus.ready}
        unboxed = session.scalars(
            select(SubInstruction.sample_id).where(SubInstruction.box_x0.is_(None))
        ).all()
        flagged = set(session.scalars(select(Sample.id).where(Sample.flagged)))
        assert set(unboxed) <= flagged
        assert all(s.startswith("pixel") for s in session.scalars(select(Sample.box_scorer)))
        n_turns = session.scalar(select(func.count()).select_from(Turn))
        expected_samples = sum(i.n_turns * (i.n_turns - 1) // 2 for i in session.scalars(select(Instance)))
        assert session.scalar(select(func.count()).select_from(Sample)) == expected_samples
    assert len(chosen_boxes(url)) >= 0.9 * n_turns
    assert mean_iou(url, demo) > 0.5
    before = counts(url)
    code, out, _ = cli("pipeline", "run", "--mllm", "none", "--json")
    again = json.loads(out)
    assert [s.get("pending") for s in again["stages"] if s["name"] != "conflict"] == [0, 0, 0]
    assert counts(url) == before  # idempotent: a re-run adds nothing
    code, out, _ = cli("pipeline", "ingest", str(demo))
    assert code == 0 and "8 already present" in out
    assert counts(url) == before


def _seed_line(source: str, turns: list[tuple[str, str]]) -> str:
    record: dict[str, str] = {"id": f"case-{len(turns)}-{turns[0][1]}-{turns[-1][0]}-{turns[-1][1]}",
                              "source_image": source}
    for i, (text, image) in enumerate(turns, start=1):
        record[f"instruction_{i}"] = text
        record[f"edit_image_{i}"] = image
    return json.dumps(record)


def test_ingest_skips_bad_records_and_reports_them(tmp_path: Path, demo: Path) -> None:
    images = demo / "images" / "data"
    good = json.loads((demo / "annotations" / "split_0001.jsonl").read_text().splitlines()[0])
    src, e1, e2 = good["source_image"], good["edit_image_1"], good["edit_image_2"]
    (images / "broken").mkdir()
    truncated = (images / e1).read_bytes()
    (images / "broken" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    (images / "broken" / "text.jpg").write_text("not an image")
    lines = [
        _seed_line(src, [("make it red", e1), ("add a boat", e2)]),
        _seed_line(src, [("make it red", e1), ("add a boat", "missing/nowhere.jpg")]),
        _seed_line(src, [("make it red", "broken/truncated.jpg"), ("add a boat", e2)]),
        _seed_line(src, [("make it red", "broken/text.jpg"), ("add a boat", e2)]),
        _seed_line(src, [("make it red", e1), ("   ", e2)]),
        json.dumps({"id": "gap", "source_image": src, "instruction_1": "a", "edit_image_1": e1,
                    "instruction_3": "c", "edit_image_3": e2}),
        "{not json",
    ]
    annotations = tmp_path / "bad" / "annotations"
    annotations.mkdir(parents=True)
    bad_file = annotations / "split_0001.jsonl"
    bad_file.write_text("\n".join(lines) + "\n")
    code, out, _ = cli("pipeline", "ingest", str(annotations), "--images-root", str(images), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["ingested"] == 1 and report["skipped"] == 6
    reasons = {r["line"]: r["reason"] for r in report["skipped_records"]}
    assert all(r["file"].endswith("split_0001.jsonl") for r in report["skipped_records"])
    assert "missing/nowhere.jpg" in reasons[2]
    assert "truncated" in reasons[3] or "corrupt" in reasons[3]
    assert "not an image" in reasons[4]
    assert "instruction_2" in reasons[5]
    assert "turn 2" in reasons[6]
    assert "JSON" in reasons[7]
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("{not json\n")
    code, _, err = cli("pipeline", "ingest", str(only_bad), "--images-root", str(images))
    assert code == 1 and "nothing could be read" in err


def _truth_by_instruction(demo: Path) -> tuple[dict[str, list[float]], set[frozenset[str]]]:
    boxes: dict[str, list[float]] = {}
    conflicting: set[frozenset[str]] = set()
    for record in truth(demo).values():
        texts = [t["instruction"] for t in record["turns"]]
        for turn in record["turns"]:
            boxes[turn["instruction"].rstrip(".").lower()] = turn["box"]
        for pair in record["conflicts"]:
            conflicting.add(frozenset(texts[i - 1].rstrip(".").lower() for i in pair))
    return boxes, conflicting


def _fake_mllm(demo: Path, garbled: str):
    """Answers like a good MLLM: conflicts and boxes from the demo's ground truth; one instruction gets prose."""
    boxes, conflicting = _truth_by_instruction(demo)

    def answer(request) -> str:
        text = "\n".join(request.texts())
        task = request.body.get("response_format", {}).get("json_schema", {}).get("name")
        if task == "conflict":
            turns = [t.rstrip(".").lower() for t in re.findall(r'Turn \d+: "(.*?)"\n', text)]
            if any(garbled in t for t in turns):
                return "I am not sure what you mean."
            hit = [i + 1 for i, a in enumerate(turns) for b in turns if a != b and frozenset((a, b)) in conflicting]
            return json.dumps({"conflict": bool(hit), "turns": sorted(set(hit)), "reason": "same object twice"})
        if task == "grounding":
            width, height = map(int, re.findall(r"Both images are (\d+)x(\d+) pixels", text)[-1])
            instruction = re.findall(r'Instruction: "(.*?)"\n', text)[-1].rstrip(".").lower()
            x0, y0, x1, y1 = boxes[instruction]
            return json.dumps([{"bbox_2d": [x0 * width, y0 * height, x1 * width, y1 * height], "label": "edit"}])
        raise AssertionError(f"unexpected request: {task}")

    return answer


def test_mllm_filter_grounding_and_cache(demo: Path, monkeypatch) -> None:
    boxes, conflicting = _truth_by_instruction(demo)
    assert conflicting, "the demo must contain a deliberate conflict"
    garbled = sorted(boxes)[0]
    with chat_server(_fake_mllm(demo, garbled)) as server:
        monkeypatch.setenv("MCIE_MLLM_BACKEND", "openai")
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        monkeypatch.setenv("MCIE_MLLM_MODEL", "test-model")
        monkeypatch.setenv("MCIE_MLLM_CONCURRENCY", "4")
        get_settings.cache_clear()
        url = get_settings().database_url
        assert cli("pipeline", "ingest", str(demo))[0] == 0
        code, out, err = cli("pipeline", "run", "--json")
        assert code == 0, out + err
        summary = json.loads(out)
        calls = len(server.requests)
        assert calls > 0
        with session_scope(url) as session:
            judgements = session.scalars(select(MllmJudgement).where(MllmJudgement.stage == "conflict")).all()
            assert judgements and all(j.raw_response and j.model == "test-model" for j in judgements)
            assert all(j.prompt_version == "conflict-v1" and j.latency_ms is not None for j in judgements)
            filtered = session.scalars(select(Sample).where(Sample.status == SampleStatus.filtered_out)).all()
            assert filtered, "windows that contain a conflicting pair are filtered out"
            for sample in filtered:
                texts = {s.text.rstrip(".").lower() for s in sample.sub_instructions}
                assert any(pair <= texts for pair in conflicting)
            flagged = session.scalars(select(Sample).where(Sample.flagged)).all()
            assert any("could not be parsed" in (s.flag_reason or "") for s in flagged)
            assert all(s.status == SampleStatus.ready for s in flagged if "parsed" in (s.flag_reason or ""))
            sources = set(session.scalars(select(BoxCandidate.source)))
            assert {"mllm", "diff"} <= {str(s) for s in sources}
        assert mean_iou(url, demo) > 0.6
        conflict_stage = next(s for s in summary["stages"] if s["name"] == "conflict")
        assert conflict_stage["calls"] == conflict_stage["pending"] and conflict_stage["failures"] == 0
        before = counts(url)
        code, out, _ = cli("pipeline", "run", "--json")
        assert code == 0
        assert len(server.requests) == calls  # cached: a re-run costs no MLLM call
        assert counts(url) == before


def test_ingest_generic_jsonl_manifest(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "manifest"
    folder.mkdir()
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200))):
        Image.new("RGB", (48, 32), colour).save(folder / f"{name}.png")
    lines = [
        {"id": "one", "dataset": "mine", "source_image": "a.png",
         "turns": [{"instruction": "make it green", "image": "b.png"},
                   {"instruction": "make it blue", "image": "c.png"}]},
        {"id": "two", "dataset": "mine", "source_image": "a.png", "turns": [{"instruction": "", "image": "b.png"}]},
    ]
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, _ = cli("pipeline", "ingest", str(folder / "edits.jsonl"), "--format", "jsonl", "--json",
                       "--license", "CC-BY-4.0")
    assert code == 0, out
    with session_scope(get_settings().database_url) as session:
        assert list(session.scalars(select(Instance.license))) == ["CC-BY-4.0"]
    report = json.loads(out)
    assert report["ingested"] == 1 and report["skipped"] == 1
    assert report["skipped_records"][0]["line"] == 2
    code, out, _ = cli("pipeline", "status", "--json")
    assert json.loads(out)["instances"] == 1
