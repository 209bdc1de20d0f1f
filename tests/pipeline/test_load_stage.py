"""The load stage's pure parts: the "no box" flag reason and the review priority."""

from __future__ import annotations

import pytest

from mcie.db.models import Sample
from mcie.pipeline.load_stage import _flag_missing, box_doubt, priority, without_no_box_reason


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (None, None),
        ("no box was found for turn(s) 1, 3", None),
        ("image looks broken; no box was found for turn(s) 2", "image looks broken"),
        ("no box was found for turn(s) 2; the MLLM's conflict answer could not be parsed: x",
         "the MLLM's conflict answer could not be parsed: x"),
        ("no box was found for turn(s) of the cat", "no box was found for turn(s) of the cat"),  # not ours
    ],
)
def test_without_no_box_reason_keeps_every_other_reason(reason: str | None, expected: str | None) -> None:
    assert without_no_box_reason(reason) == expected


def test_flag_missing_sets_replaces_and_clears_only_its_own_reason() -> None:
    sample = Sample(flagged=False, flag_reason=None)
    _flag_missing(sample, [3, 1])
    assert sample.flagged and sample.flag_reason == "no box was found for turn(s) 1, 3"
    _flag_missing(sample, [3])  # a retry found turn 1's box: the reason is rewritten, not appended
    assert sample.flag_reason == "no box was found for turn(s) 3"
    sample.flag_reason = "reviewer: blurry; no box was found for turn(s) 3"
    _flag_missing(sample, [])
    assert sample.flagged and sample.flag_reason == "reviewer: blurry"
    sample.flag_reason = "no box was found for turn(s) 3"
    _flag_missing(sample, [])
    assert not sample.flagged and sample.flag_reason is None
    legacy = Sample(flagged=True, flag_reason=None)  # flagged without a reason: stays flagged
    _flag_missing(legacy, [])
    assert legacy.flagged and legacy.flag_reason is None


def test_priority_drops_by_the_flag_weight_when_the_flag_goes() -> None:
    doubt = box_doubt({1: [0.9, 0.88], 2: [0.5]}, range(1, 3))
    assert doubt == pytest.approx(0.6)
    assert priority(0.0, doubt, True) - priority(0.0, doubt, False) == pytest.approx(0.2)
    assert box_doubt({1: [0.9]}, range(1, 3)) == 1.0  # turn 2 has no candidate at all
