"""The study design balances items and screen positions within its stated bounds, deterministically from the seed."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from mcie.annotate.study_design import (
    Design,
    Screen,
    balance,
    default_attention_positions,
    design,
    method_position_counts,
    stated_bounds,
    williams_square,
)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8])
def test_williams_square_is_latin_and_neighbour_balanced(n: int) -> None:
    square = williams_square(n)
    assert square.shape == (n if n % 2 == 0 else 2 * n, n)
    for block in np.split(square, len(square) // n):
        assert all(sorted(row) == list(range(n)) for row in block)
        assert all(sorted(col) == list(range(n)) for col in block.T)
    neighbours = Counter((int(a), int(b)) for row in square for a, b in itertools.pairwise(row))
    assert set(neighbours) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(neighbours.values())) == 1


def test_paper_sized_study_is_balanced_within_the_stated_bounds() -> None:
    """50 participants x 100 items drawn from 400 items, 5 methods (the paper's study on a 400-item pool)."""
    result = design(400, 5, 50, 100, seed=7)
    report = balance(result)
    counts = Counter(screen.item for seq in result.sequences for screen in seq)
    assert set(counts) == set(range(400))
    assert max(counts.values()) - min(counts.values()) <= 1 == report["item_count_spread"]
    position = method_position_counts([s for seq in result.sequences for s in seq], 5)
    assert int(position.max() - position.min()) <= stated_bounds(5)["method_position_spread"] == 1
    assert position.sum() == 50 * 100 * 5
    assert report["participant_method_position_spread"] <= stated_bounds(5)["participant_method_position_spread"]
    assert report["within_bounds"]
    # per item no bound is guaranteed, but the assignment step keeps it low (random rows give spreads of ~8)
    assert report["item_method_position_spread"] <= 3
    for seq in result.sequences:
        assert len(seq) == 100 and len({s.item for s in seq}) == 100
        assert all(sorted(s.order) == list(range(5)) for s in seq)


@pytest.mark.parametrize(
    ("n_items", "n_methods", "n_participants", "per", "attention"),
    [
        (30, 3, 17, 7, ()),
        (61, 4, 23, 13, (0, 60)),
        (25, 5, 9, 24, (3,)),
        (12, 2, 40, 5, ()),
        (50, 6, 11, 17, (10, 20, 30)),
        (40, 7, 13, 9, ()),
    ],
)
def test_bounds_hold_for_awkward_sizes(n_items, n_methods, n_participants, per, attention) -> None:
    result = design(n_items, n_methods, n_participants, per, seed=3, attention_items=attention)
    report = balance(result)
    assert report["within_bounds"], report
    assert report["n_regular_screens"] == n_participants * per
    assert report["n_attention_screens"] == n_participants * len(attention)
    assert sum(report["item_counts"]) == n_participants * per


def test_every_prefix_of_participants_is_balanced_and_prefix_stable() -> None:
    full = design(37, 4, 15, 10, seed=11)
    for k in range(1, 16):
        prefix = design(37, 4, k, 10, seed=11)
        assert prefix.sequences == full.sequences[:k]
        assert balance(prefix)["item_count_spread"] <= 1
        assert balance(prefix)["method_position_spread"] <= 1


def test_deterministic_from_the_seed_and_shuffled_per_participant() -> None:
    assert design(40, 3, 6, 10, seed=5) == design(40, 3, 6, 10, seed=5)
    assert design(40, 3, 6, 10, seed=5).sequences != design(40, 3, 6, 10, seed=6).sequences
    result = design(10, 3, 8, 10, seed=1)  # everyone sees all 10 items, so only the order differs
    orders = {tuple(s.item for s in seq) for seq in result.sequences}
    assert len(orders) == 8


def test_attention_items_at_the_same_positions_for_everyone() -> None:
    result = design(20, 3, 9, 8, seed=2, attention_items=(4, 9))
    assert result.attention_positions == default_attention_positions(10, 2) == (4, 7)
    for seq in result.sequences:
        assert len(seq) == 10
        assert (seq[3].item, seq[6].item) == (4, 9) and seq[3].attention and seq[6].attention
        assert not any(s.attention for k, s in enumerate(seq) if k not in (3, 6))
        assert {4, 9}.isdisjoint(s.item for k, s in enumerate(seq) if k not in (3, 6))
    answers = Counter(seq[3].order.index(0) for seq in result.sequences)  # method 0 moves around the screen
    assert len(answers) == 3 and max(answers.values()) - min(answers.values()) <= 1
    assert balance(result)["attention_method_position_spread"] <= 1
    custom = design(20, 3, 2, 8, seed=2, attention_items=(4, 9), attention_positions=(1, 10))
    assert all(seq[0].item == 4 and seq[9].item == 9 for seq in custom.sequences)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"items_per_participant": 11}, "more than the 10 regular items"),
        ({"attention_items": (12,)}, "not item indices"),
        ({"attention_items": (1, 1)}, "duplicates"),
        ({"attention_items": (1,), "attention_positions": (1, 2)}, "2 entries for 1"),
        ({"attention_items": (1,), "attention_positions": (9,)}, "distinct positions 1..6"),
        ({"n_methods": 1}, "n_methods must be an integer >= 2"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, message) -> None:
    args = {"n_items": 10, "n_methods": 3, "n_participants": 2, "items_per_participant": 5, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        design(**args)


def test_balance_reports_an_unbalanced_design() -> None:
    screens = (Screen(0, (0, 1)), Screen(1, (0, 1)), Screen(2, (0, 1)))
    lopsided = Design(4, 2, 1, 3, 0, (), (), ((0, 1), (1, 0)), (screens,))
    report = balance(lopsided)
    assert report["item_counts"] == [1, 1, 1, 0] and report["item_count_spread"] == 1
    assert report["method_position_counts"] == [[3, 0], [0, 3]] and report["method_position_spread"] == 3
    assert not report["within_bounds"]
