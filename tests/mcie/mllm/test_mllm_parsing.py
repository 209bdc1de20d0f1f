"""Tests of the MLLM answer parsers over the answer shapes real models produce."""

from __future__ import annotations

import json

import pytest

from mcie.mllm.parsing import (
    ConflictVerdict,
    Decomposition,
    GroundingAnswer,
    JudgeScores,
    ParseFailure,
    PixelBox,
    clean_box,
    extract_json,
    parse_conflict,
    parse_decomposition,
    parse_grounding,
    parse_judge,
)

# --- extract_json -------------------------------------------------------------------------------------------

OBJ = {"conflict": True, "turns": [1, 3], "reason": "same cup"}


@pytest.mark.parametrize(
    ("text", "note"),
    [
        (json.dumps(OBJ), None),
        ("```json\n" + json.dumps(OBJ) + "\n```", None),
        ("```\n" + json.dumps(OBJ, indent=2) + "\n```", None),
        ("Sure! Here is the answer:\n" + json.dumps(OBJ) + "\nLet me know if you need more.", "around"),
        ("Turn [1] and turn [3] both edit the cup. " + json.dumps(OBJ), "around"),
        ("{'conflict': True, 'turns': [1, 3], 'reason': 'same cup'}", "non-JSON"),
        ('{"conflict": true, "turns": [1, 3,], "reason": "same cup",}', "non-JSON"),
        ("Answer: {'conflict': true, 'turns': (1, 3), 'reason': 'same cup'} done", "non-JSON"),
    ],
)
def test_extract_json_reads_common_wrappings(text: str, note: str | None) -> None:
    found = extract_json(text)
    assert not isinstance(found, ParseFailure), found
    assert found.value == OBJ
    if note is None:
        assert found.notes == ()
    else:
        assert any(note in n for n in found.notes), found.notes


def test_extract_json_prefers_the_fenced_block_over_prose_json() -> None:
    text = 'I considered {"a": 1} first.\n```json\n{"conflict": false, "turns": [], "reason": "x"}\n```'
    found = extract_json(text)
    assert not isinstance(found, ParseFailure)
    assert found.value["conflict"] is False


def test_extract_json_closes_truncated_output_after_the_last_complete_element() -> None:
    found = extract_json('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7')
    assert not isinstance(found, ParseFailure)
    assert found.value == [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6]}]
    assert any("cut off" in n for n in found.notes)


def test_extract_json_keeps_a_cut_off_text_value() -> None:
    found = extract_json('```json\n{"conflict": true, "turns": [2], "reason": "the hat is edi')
    assert not isinstance(found, ParseFailure)
    assert found.value == {"conflict": True, "turns": [2], "reason": "the hat is edi"}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("I cannot determine this from the images.", "no JSON"),
        ("{conflict: maybe}", "no JSON"),
        ('{"conflict": tr', "no JSON"),  # cut off before any complete value
    ],
)
def test_extract_json_failures_carry_raw_text_and_reason(text: str, reason: str) -> None:
    found = extract_json(text)
    assert isinstance(found, ParseFailure)
    assert found.raw == text
    assert reason in found.reason
    assert found.ok is False


# --- conflict -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "conflict", "turns", "reason"),
    [
        ('{"conflict": true, "turns": [1, 3], "reason": "cup twice"}', True, (1, 3), "cup twice"),
        ('{"conflict": false, "turns": [], "reason": "different objects"}', False, (), "different objects"),
        ('{"conflict": "yes", "turns": "1, 2", "reason": "r"}', True, (1, 2), "r"),
        ('{"conflict": "No", "turns": [], "reason": "r"}', False, (), "r"),
        ('{"Conflict": "TRUE.", "Turns": ["turn 2", "Turn 3"], "Reason": "r"}', True, (2, 3), "r"),
        ('{"has_conflict": 1, "conflicting_turns": [2, 3], "explanation": "hat"}', True, (2, 3), "hat"),
        ('{"is_conflict": false, "reasoning": "fine"}', False, (), "fine"),
        ('{"conflicts": [{"turns": [1, 2], "reason": "car twice"}]}', True, (1, 2), "car twice"),
        ('{"conflicts": [], "reason": "none"}', False, (), "none"),
        ('[{"conflict": true, "turns": [{"turn": 1}, {"turn": 2}], "reason": "r"}]', True, (1, 2), "r"),
        ('{"reason": "r", "conflict": true, "turns": [2, 2, 1]}', True, (2, 1), "r"),
        ('{"answer": "Yes, turns 1 and 3 edit the cup", "turns": [1, 3], "why": "cup"}', True, (1, 3), "cup"),
        ('{"Conflict?": "No conflict", "Reason:": "apart"}', False, (), "apart"),
    ],
)
def test_parse_conflict_shapes(text: str, conflict: bool, turns: tuple[int, ...], reason: str) -> None:
    verdict = parse_conflict(text)
    assert isinstance(verdict, ConflictVerdict), verdict
    assert (verdict.conflict, verdict.turns, verdict.reason) == (conflict, turns, reason)


def test_parse_conflict_notes_renamed_keys_and_missing_reason() -> None:
    verdict = parse_conflict('{"has_conflict": "no"}')
    assert isinstance(verdict, ConflictVerdict)
    assert verdict.conflict is False
    assert any("has_conflict" in n for n in verdict.notes)
    assert any("no reason" in n for n in verdict.notes)


def test_parse_conflict_drops_turns_out_of_range_with_a_note() -> None:
    verdict = parse_conflict('{"conflict": true, "turns": [0, 2, 5], "reason": "r"}', n_turns=3)
    assert isinstance(verdict, ConflictVerdict)
    assert verdict.turns == (2,)
    assert any("outside 1..3" in n and "[0, 5]" in n for n in verdict.notes)


def test_parse_conflict_ignores_turns_listed_without_a_conflict_and_says_so() -> None:
    verdict = parse_conflict('{"conflict": false, "turns": [1, 2], "reason": "checked both"}')
    assert isinstance(verdict, ConflictVerdict)
    assert verdict.turns == ()
    assert any("ignored the listed turns" in n for n in verdict.notes)


@pytest.mark.parametrize(("text", "expected"), [("Yes.", True), ("no", False), ("  False!", False)])
def test_parse_conflict_accepts_a_bare_yes_no_with_a_note(text: str, expected: bool) -> None:
    verdict = parse_conflict(text)
    assert isinstance(verdict, ConflictVerdict)
    assert verdict.conflict is expected
    assert verdict.notes


def test_parse_conflict_truncated_keeps_the_verdict() -> None:
    verdict = parse_conflict('{"conflict": true, "turns": [1, 2], "reason": "both turns edit the la')
    assert isinstance(verdict, ConflictVerdict)
    assert verdict.conflict is True and verdict.turns == (1, 2)
    assert verdict.reason == "both turns edit the la"
    assert any("cut off" in n for n in verdict.notes)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"conflict": "maybe", "reason": "unclear"}', "expected true/false"),
        ('{"conflict_free": true, "reason": "r"}', "no 'conflict' field"),  # never read as a verdict
        ('{"turns": [1], "reason": "r"}', "no 'conflict' field"),
        ("[1, 2, 3]", "expected a JSON object"),
        ("The first and the third turn both modify the cup.", "no JSON"),
        ('{"reason": "the model stopped before the verdi', "no 'conflict' field"),
    ],
)
def test_parse_conflict_failures(text: str, reason: str) -> None:
    result = parse_conflict(text)
    assert isinstance(result, ParseFailure)
    assert result.raw == text
    assert reason in result.reason


# --- boxes and grounding ------------------------------------------------------------------------------------


def test_clean_box_swaps_clips_and_drops() -> None:
    box, notes = clean_box((50, 60, 10, 20), 100, 100)
    assert box == PixelBox(10, 20, 50, 60)
    assert len(notes) == 2 and all("swapped" in n for n in notes)
    box, notes = clean_box((-5, 10, 130, 90), 100, 80, label="x")
    assert box == PixelBox(0, 10, 100, 80, "x")
    assert any("clipped" in n for n in notes)
    box, notes = clean_box((120, 10, 150, 50), 100, 100)
    assert box is None and "dropped" in notes[0]
    box, notes = clean_box((10, 10, 10.5, 50), 100, 100)
    assert box is None


QWEN_ANSWER = """```json
[
\t{"bbox_2d": [135, 114, 372, 350], "label": "the cat"},
\t{"bbox_2d": [120, 100, 390, 372], "label": "cat and cushion"}
]
```"""


def test_parse_grounding_qwen_list() -> None:
    answer = parse_grounding(QWEN_ANSWER, 640, 480)
    assert isinstance(answer, GroundingAnswer)
    assert [b.as_tuple() for b in answer.boxes] == [(135, 114, 372, 350), (120, 100, 390, 372)]
    assert [b.label for b in answer.boxes] == ["the cat", "cat and cushion"]
    assert answer.notes == ()


@pytest.mark.parametrize(
    ("text", "boxes"),
    [
        ("[10, 20, 30, 40]", [(10, 20, 30, 40)]),
        ("The box is [10.5, 20, 30, 40.25].", [(10.5, 20, 30, 40.25)]),
        ('{"bbox_2d": [10, 20, 30, 40], "label": "a"}', [(10, 20, 30, 40)]),
        ('{"boxes": [{"bbox": [1, 2, 3, 4]}, {"box": ["5", "6", "7", "8"]}]}', [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ('{"candidates": [[1, 2, 3, 4], [2, 3, 4, 5]]}', [(1, 2, 3, 4), (2, 3, 4, 5)]),
        ("[[1, 2, 3, 4], [2, 3, 4, 5]]", [(1, 2, 3, 4), (2, 3, 4, 5)]),
        ('[{"bbox_2d": [[10, 20], [30, 40]]}]', [(10, 20, 30, 40)]),
        ('[{"bbox_2d": "10, 20, 30, 40"}]', [(10, 20, 30, 40)]),
        ('[{"bounding_box": {"xmin": 1, "ymin": 2, "xmax": 3, "ymax": 4}}]', [(1, 2, 3, 4)]),
        ("[{'bbox_2d': [10, 20, 30, 40], 'label': 'cup'},]", [(10, 20, 30, 40)]),
    ],
)
def test_parse_grounding_shapes(text: str, boxes: list[tuple[float, ...]]) -> None:
    answer = parse_grounding(text, 640, 480)
    assert isinstance(answer, GroundingAnswer), answer
    assert [b.as_tuple() for b in answer.boxes] == boxes


def test_parse_grounding_repairs_boxes_and_notes_every_change() -> None:
    text = json.dumps(
        [
            {"bbox_2d": [300, 200, 100, 50], "label": "swapped"},
            {"bbox_2d": [600, 400, 900, 700], "label": "overflow"},
            {"bbox_2d": [700, 500, 800, 600], "label": "outside"},
            {"bbox_2d": [5, 5, 5, 80], "label": "flat"},
            {"label": "no box"},
        ]
    )
    answer = parse_grounding(text, 640, 480)
    assert isinstance(answer, GroundingAnswer)
    assert answer.boxes == (PixelBox(100, 50, 300, 200, "swapped"), PixelBox(600, 400, 640, 480, "overflow"))
    joined = " | ".join(answer.notes)
    assert "box 1: swapped x0 > x1" in joined and "box 1: swapped y0 > y1" in joined
    assert "box 2: clipped" in joined
    assert "box 3: dropped" in joined and "box 4: dropped" in joined
    assert "item 5: skipped" in joined


def test_parse_grounding_keeps_k_and_recovers_truncated_lists() -> None:
    text = (
        '[{"bbox_2d": [1, 1, 9, 9]}, {"bbox_2d": [2, 2, 8, 8]}, '
        '{"bbox_2d": [3, 3, 7, 7]}, {"bbox_2d": [4, 4'
    )
    answer = parse_grounding(text, 10, 10, k=2)
    assert isinstance(answer, GroundingAnswer)
    assert [b.as_tuple() for b in answer.boxes] == [(1, 1, 9, 9), (2, 2, 8, 8)]
    assert any("cut off" in n for n in answer.notes)
    assert any("first 2 of 3" in n for n in answer.notes)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I could not find the edited region.", "no JSON"),
        ('{"label": "cup"}', "no box found"),
        ('[{"bbox_2d": [10, 20, 30]}]', "expected 4 numbers"),
        ('[{"bbox_2d": [700, 500, 800, 600]}]', "no usable box"),
        ('[{"bbox_2d": [1, 2, "x", 4]}]', "no usable box"),
    ],
)
def test_parse_grounding_failures(text: str, reason: str) -> None:
    result = parse_grounding(text, 640, 480)
    assert isinstance(result, ParseFailure)
    assert result.raw == text and reason in result.reason


@pytest.mark.parametrize("text", ["[]", '{"boxes": []}', '```json\n{"Bounding boxes": []}\n```', " [ ] "])
def test_parse_grounding_reads_an_empty_list_as_nothing_to_ground(text: str) -> None:
    answer = parse_grounding(text, 640, 480)
    assert isinstance(answer, GroundingAnswer) and answer.boxes == ()
    assert "the answer names no box" in answer.notes


@pytest.mark.parametrize("text", ["", "   ", '{"boxes": [], "bbox_2d": [1, 2]}', '{"label": []}', "[[]]"])
def test_parse_grounding_blank_or_malformed_is_still_a_failure(text: str) -> None:
    assert isinstance(parse_grounding(text, 640, 480), ParseFailure)


def test_parse_grounding_rejects_a_bad_frame() -> None:
    with pytest.raises(ValueError, match="positive frame size"):
        parse_grounding("[1, 2, 3, 4]", 0, 10)


# --- decomposition ------------------------------------------------------------------------------------------


def test_parse_decomposition_reads_edits_and_normalizes_operations() -> None:
    text = """Here is the decomposition:
```json
{"edits": [
  {"instruction": "add an apple on the table", "operation": "ADD", "bbox_2d": [10, 10, 40, 40]},
  {"instruction": "add an apple on the table", "operation": "Insert", "bbox_2d": [50, 10, 80, 40]},
  {"sub_instruction": "remove the car", "op": "delete", "bbox": [0, 50, 60, 99]},
  {"instruction": "make the door blue", "type": "color change", "box": [70, 20, 90, 95]}
]}
```"""
    result = parse_decomposition(text, 100, 100)
    assert isinstance(result, Decomposition), result
    assert [(e.instruction, e.operation) for e in result.edits] == [
        ("add an apple on the table", "add"),
        ("add an apple on the table", "add"),
        ("remove the car", "remove"),
        ("make the door blue", "change"),
    ]
    assert result.edits[2].box == PixelBox(0, 50, 60, 99)


def test_parse_decomposition_infers_missing_operation_and_keeps_boxless_edits_with_notes() -> None:
    text = json.dumps(
        [
            {"instruction": "Remove the lamp", "bbox_2d": [1, 1, 5, 5]},
            {"instruction": "turn the sky pink", "operation": "change"},
            {"instruction": "zoom in", "operation": "zoom"},
            {"operation": "add", "bbox_2d": [1, 1, 5, 5]},
        ]
    )
    result = parse_decomposition(text, 10, 10)
    assert isinstance(result, Decomposition)
    assert [(e.operation, e.box is None) for e in result.edits] == [("remove", False), ("change", True)]
    joined = " | ".join(result.notes)
    assert "edit 1: operation inferred" in joined
    assert "edit 2: no usable box" in joined
    assert "edit 3: dropped" in joined and "'zoom'" in joined
    assert "edit 4: dropped, no sub-instruction" in joined


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"plan": "do it"}', "expected {\"edits\""),
        ('{"edits": []}', "no usable sub-edit"),
        ('{"edits": [{"instruction": "enhance", "operation": "sharpen"}]}', "no usable sub-edit"),
        ("Sorry, I can't help.", "no JSON"),
    ],
)
def test_parse_decomposition_failures(text: str, reason: str) -> None:
    result = parse_decomposition(text, 100, 100)
    assert isinstance(result, ParseFailure)
    assert reason in result.reason


# --- judge --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ic", "bc"),
    [
        ('{"reason": "ok", "instruction_compliance": 8, "background_consistency": 4}', 8, 4),
        ('```json\n{"IC": "7/10", "BC": "4 out of 5", "reason": "ok"}\n```', 7, 4),
        ('{"Instruction Compliance": 9.0, "Background Consistency": "5"}', 9, 5),
        ('{"scores": {"instruction_compliance": 3, "background_consistency": 2}, "reason": "poor"}', 3, 2),
        ('{"instruction_compliance": {"score": 6}, "background_consistency": {"score": 3}}', 6, 3),
        ('{"Instruction Compliance (1-10)": 4, "Background Consistency (1-5)": 2}', 4, 2),
    ],
)
def test_parse_judge_shapes(text: str, ic: int, bc: int) -> None:
    scores = parse_judge(text)
    assert isinstance(scores, JudgeScores), scores
    assert (scores.instruction_compliance, scores.background_consistency) == (ic, bc)


def test_parse_judge_rounds_with_a_note_and_normalizes() -> None:
    scores = parse_judge('{"instruction_compliance": 7.5, "background_consistency": 4, "reason": "r"}')
    assert isinstance(scores, JudgeScores)
    assert scores.instruction_compliance == 8
    assert any("rounded 7.5 to 8" in n for n in scores.notes)
    assert scores.normalized() == (0.8, 0.8)
    assert scores.to_dict()["instruction_compliance"] == 8


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"instruction_compliance": 11, "background_consistency": 4}', "expected a score 1-10"),
        ('{"instruction_compliance": 5, "background_consistency": 0}', "expected a score 1-5"),
        ('{"instruction_compliance": "good", "background_consistency": 4}', "expected a score 1-10"),
        ('{"instruction_compliance": 5}', "no 'background_consistency' field"),
        ('{"reason": "the edit is fine"}', "no 'instruction_compliance' field"),
    ],
)
def test_parse_judge_failures(text: str, reason: str) -> None:
    result = parse_judge(text)
    assert isinstance(result, ParseFailure)
    assert reason in result.reason and result.raw == text
