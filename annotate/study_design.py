"""The user study's design: which items each participant judges, in which order, and how the methods are laid out.

Pure and deterministic (numpy/scipy only, no database): :func:`design` maps ``(n_items, n_methods, n_participants,
items_per_participant, seed, attention_items)`` to one sequence of screens per participant. Items and methods are
0-based indices here; :mod:`annotate.study` maps them to study items (in ``study_items.id`` order) and method names
(sorted) and stores the sequences in ``study_assignments``.

How a sequence is built
-----------------------
* **Items** (the regular ones, i.e. every item not in ``attention_items``): participant ``p`` takes the
  ``items_per_participant`` items that have been given out least often so far, ties broken at random. Every item
  therefore collects the same number of votes, up to one (*per-item spread <= 1*), after every participant - not only
  at the end, so a study that stops early is balanced too. The order of a participant's items is shuffled.
* **Screen order of the methods** comes from a *balanced Latin square* (Williams design) whose symbols are relabelled
  by one seeded random permutation of the methods: ``m`` rows for an even number of methods ``m``, ``2m`` rows (the
  square and its mirror image) for an odd one. Every row shows every method once; every method is in every screen
  position once per square, and every ordered pair of neighbours (method X directly left of Y) occurs equally often.
  The regular screens of the whole study take the rows in turn (screen ``k`` of participant ``p`` takes row
  ``(p * items_per_participant + k) mod R``), so each participant gets a run of consecutive rows; which of their items
  gets which of their rows is then chosen (an assignment problem, with random tie-breaks) to keep each item's own
  method/position counts even.
* **Attention checks**: the items in ``attention_items`` are shown to everyone, at the same positions of the
  sequence (``attention_positions``, 1-based, default evenly spaced), in addition to the regular items. Attention
  item ``j`` is shown to participant ``p`` in row ``(p + j) mod m`` of the first ``m`` rows of the square (a Latin
  square), so its obvious answer visits every screen position in turn.

Balance bounds (checked by :func:`balance` and the tests)
---------------------------------------------------------
* per-item vote counts over the regular items: max - min <= 1 (needs ``items_per_participant <= n_regular``);
* per-(method, position) counts over all regular screens of the study: max - min <= 1;
* per-(method, position) counts of each attention item over the participants: max - min <= 1;
* per-(method, position) counts within one participant's regular screens: max - min <= 1 for an even number of
  methods, <= 2 for an odd one, and 0 when ``items_per_participant`` is a multiple of the number of rows ``R``;
* per item, the method/position counts are kept even by the assignment step but carry no guarantee (reported).

The design is prefix-stable: the first ``k`` sequences of ``design(..., n_participants=n)`` do not depend on ``n``,
so participants can be enrolled one at a time (the service asks for ``n_participants = k + 1`` and takes the last).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

_TIE_BREAK = 1e-3  # random noise added to the assignment costs (integers), below any real difference


@dataclass(frozen=True)
class Screen:
    """One screen of a participant's sequence: an item and the methods from left to right (screen position 0...)."""

    item: int
    order: tuple[int, ...]
    attention: bool = False


@dataclass(frozen=True)
class Design:
    """The sequences of a study: ``sequences[p]`` is participant ``p``'s list of screens, in the order shown."""

    n_items: int
    n_methods: int
    n_participants: int
    items_per_participant: int
    seed: int
    attention_items: tuple[int, ...]
    attention_positions: tuple[int, ...]
    square: tuple[tuple[int, ...], ...]
    sequences: tuple[tuple[Screen, ...], ...]

    @property
    def regular_items(self) -> tuple[int, ...]:
        attention = set(self.attention_items)
        return tuple(i for i in range(self.n_items) if i not in attention)

    @property
    def sequence_length(self) -> int:
        return self.items_per_participant + len(self.attention_items)


# ----------------------------------------------------------------------------------------------------------
# Latin squares


def williams_square(n: int) -> NDArray[np.int64]:
    """The balanced Latin square of Williams (1949) on symbols ``0..n-1``, as an ``R x n`` array of rows.

    ``R = n`` for even ``n``; for odd ``n`` the square is followed by its mirror image (each row reversed), ``R = 2n``.
    Each block of ``n`` rows is a Latin square (every symbol once per row and per column) and, over all ``R`` rows,
    every ordered pair of distinct symbols is adjacent (left, right) equally often.
    """
    if n < 1:
        raise ValueError(f"a Latin square needs at least one symbol; got n={n}")
    first = [0]
    low, high = 1, n - 1
    for j in range(1, n):
        if j % 2 == 1:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    base = (np.asarray(first)[None, :] + np.arange(n)[:, None]) % n
    if n % 2 == 1 and n > 1:
        base = np.vstack([base, base[:, ::-1]])
    return base.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# validation


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_attention(attention_items: Sequence[int], n_items: int) -> tuple[int, ...]:
    items = tuple(_check_int(i, "attention_items[]", 0) for i in attention_items)
    bad = [i for i in items if i >= n_items]
    if bad:
        raise ValueError(f"attention_items {bad} are not item indices 0..{n_items - 1}")
    if len(set(items)) != len(items):
        raise ValueError(f"attention_items has duplicates: {list(items)}")
    return items


def default_attention_positions(sequence_length: int, n_attention: int) -> tuple[int, ...]:
    """``n_attention`` positions (1-based) spread evenly over a sequence of ``sequence_length`` screens."""
    step = (sequence_length + 1) / (n_attention + 1)
    return tuple(round((j + 1) * step) for j in range(n_attention))


def _check_positions(positions: Sequence[int] | None, length: int, n_attention: int) -> tuple[int, ...]:
    if positions is None:
        return default_attention_positions(length, n_attention)
    checked = tuple(_check_int(p, "attention_positions[]", 1) for p in positions)
    if len(checked) != n_attention:
        raise ValueError(f"attention_positions has {len(checked)} entries for {n_attention} attention items")
    if len(set(checked)) != len(checked) or max(checked, default=1) > length:
        raise ValueError(f"attention_positions must be distinct positions 1..{length}; got {list(checked)}")
    return checked


# ----------------------------------------------------------------------------------------------------------
# construction


def _pick_items(counts: NDArray[np.int64], k: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Indices of the ``k`` least-used entries of ``counts``, ties broken at random."""
    order = np.lexsort((rng.random(len(counts)), counts))
    return order[:k]


def _match_rows(
    item_counts: NDArray[np.int64],
    items: NDArray[np.int64],
    rows: NDArray[np.int64],
    square: NDArray[np.int64],
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """Give each item one of ``rows`` (a permutation of them) so that per-item method/position counts stay even.

    The cost of showing item ``i`` with row ``r`` is the sum of ``item_counts[i, method, position]`` over the row's
    (method, position) cells: the increase of the per-item sum of squared counts, up to a constant.
    """
    m = square.shape[1]
    layouts = square[rows]  # (k, m): method at each position
    cost = item_counts[items][:, layouts, np.arange(m)].sum(axis=-1).astype(np.float64)  # (k items, k rows)
    cost += rng.random(cost.shape) * _TIE_BREAK
    item_idx, row_idx = linear_sum_assignment(cost)
    matched = np.empty(len(items), dtype=np.int64)
    matched[item_idx] = rows[row_idx]
    return matched


def _sequences(
    n_items: int,
    n_methods: int,
    items_per_participant: int,
    seed: int,
    attention_items: tuple[int, ...],
    attention_positions: tuple[int, ...],
    square: NDArray[np.int64],
) -> Iterator[tuple[Screen, ...]]:
    """Participants' sequences in order, endlessly (prefix-stable: participant p's draws use their own generator)."""
    regular = np.asarray([i for i in range(n_items) if i not in set(attention_items)], dtype=np.int64)
    n_rows = square.shape[0]
    use_counts = np.zeros(len(regular), dtype=np.int64)
    item_counts = np.zeros((n_items, n_methods, n_methods), dtype=np.int64)  # [item, method, position]
    length = items_per_participant + len(attention_items)
    slots = [pos - 1 for pos in attention_positions]
    regular_slots = [s for s in range(length) if s not in set(slots)]
    p = 0
    while True:
        rng = np.random.default_rng([seed, 1, p])
        picked = _pick_items(use_counts, items_per_participant, rng)
        use_counts[picked] += 1
        items = regular[picked]
        rows = (p * items_per_participant + np.arange(items_per_participant)) % n_rows
        matched = _match_rows(item_counts, items, rows, square, rng)
        for item, row in zip(items, matched, strict=True):
            item_counts[item, square[row], np.arange(n_methods)] += 1
        shuffled = rng.permutation(len(items))
        sequence: list[Screen | None] = [None] * length
        for slot, idx in zip(regular_slots, shuffled, strict=True):
            sequence[slot] = Screen(int(items[idx]), tuple(int(x) for x in square[matched[idx]]), False)
        for j, (slot, item) in enumerate(zip(slots, attention_items, strict=True)):
            row = (p + j) % n_methods
            sequence[slot] = Screen(item, tuple(int(x) for x in square[row]), True)
        yield tuple(s for s in sequence if s is not None)
        p += 1


def design(
    n_items: int,
    n_methods: int,
    n_participants: int,
    items_per_participant: int,
    seed: int,
    attention_items: Sequence[int] = (),
    *,
    attention_positions: Sequence[int] | None = None,
) -> Design:
    """Assign every participant a sequence of screens (see the module docstring for the construction and bounds).

    ``n_items`` counts every item, attention checks included; ``attention_items`` are indices among them and are
    shown to every participant in addition to their ``items_per_participant`` regular items, at
    ``attention_positions`` (1-based positions in the sequence of ``items_per_participant + len(attention_items)``
    screens; default evenly spaced).
    """
    n_items = _check_int(n_items, "n_items", 1)
    n_methods = _check_int(n_methods, "n_methods", 2)
    n_participants = _check_int(n_participants, "n_participants", 0)
    items_per_participant = _check_int(items_per_participant, "items_per_participant", 1)
    seed = _check_int(seed, "seed", 0)
    attention = _check_attention(attention_items, n_items)
    n_regular = n_items - len(attention)
    if items_per_participant > n_regular:
        raise ValueError(
            f"items_per_participant ({items_per_participant}) is more than the {n_regular} regular items"
            f" ({n_items} items, {len(attention)} of them attention checks)"
        )
    positions = _check_positions(attention_positions, items_per_participant + len(attention), len(attention))
    rng = np.random.default_rng([seed, 0])
    square = rng.permutation(n_methods)[williams_square(n_methods)]
    generator = _sequences(n_items, n_methods, items_per_participant, seed, attention, positions, square)
    sequences = tuple(next(generator) for _ in range(n_participants))
    return Design(
        n_items=n_items,
        n_methods=n_methods,
        n_participants=n_participants,
        items_per_participant=items_per_participant,
        seed=seed,
        attention_items=attention,
        attention_positions=positions,
        square=tuple(tuple(int(x) for x in row) for row in square),
        sequences=sequences,
    )


# ----------------------------------------------------------------------------------------------------------
# balance report


def _spread(counts: NDArray[np.int64]) -> int:
    return int(counts.max() - counts.min()) if counts.size else 0


def method_position_counts(screens: Sequence[Screen], n_methods: int) -> NDArray[np.int64]:
    """``counts[method, position]`` over ``screens``."""
    counts = np.zeros((n_methods, n_methods), dtype=np.int64)
    for screen in screens:
        counts[list(screen.order), np.arange(len(screen.order))] += 1
    return counts


def stated_bounds(n_methods: int) -> dict[str, int]:
    """The balance this module guarantees (see the module docstring)."""
    return {
        "item_count_spread": 1,
        "method_position_spread": 1,
        "attention_method_position_spread": 1,
        "participant_method_position_spread": 1 if n_methods % 2 == 0 else 2,
    }


def balance(design: Design) -> dict[str, Any]:
    """How balanced ``design`` is: per-item vote counts and per-(method, position) counts, with their spreads.

    Keys: ``item_counts`` (regular items, in index order) and ``item_count_spread``; ``method_position_counts``
    (``[method][position]`` over all regular screens) and ``method_position_spread``;
    ``attention_method_position_spread`` (the worst attention item, None without any);
    ``participant_method_position_spread`` (the worst participant); ``item_method_position_spread`` (the worst item,
    no guarantee); ``bounds`` (:func:`stated_bounds`) and ``within_bounds``.
    """
    m = design.n_methods
    regular = [s for seq in design.sequences for s in seq if not s.attention]
    attention = [s for seq in design.sequences for s in seq if s.attention]
    index = {item: k for k, item in enumerate(design.regular_items)}
    item_counts = np.zeros(len(index), dtype=np.int64)
    per_item = np.zeros((len(index), m, m), dtype=np.int64)
    for screen in regular:
        item_counts[index[screen.item]] += 1
        per_item[index[screen.item], list(screen.order), np.arange(m)] += 1
    overall = method_position_counts(regular, m)
    per_participant = [
        _spread(method_position_counts([s for s in seq if not s.attention], m)) for seq in design.sequences
    ]
    report: dict[str, Any] = {
        "n_participants": design.n_participants,
        "n_regular_screens": len(regular),
        "n_attention_screens": len(attention),
        "item_counts": item_counts.tolist(),
        "item_count_spread": _spread(item_counts),
        "method_position_counts": overall.tolist(),
        "method_position_spread": _spread(overall),
        "attention_method_position_spread": max(
            (
                _spread(method_position_counts([s for s in attention if s.item == item], m))
                for item in design.attention_items
            ),
            default=None,
        ),
        "participant_method_position_spread": max(per_participant, default=0),
        "item_method_position_spread": max((_spread(c) for c in per_item if c.sum()), default=0),
        "bounds": stated_bounds(m),
    }
    report["within_bounds"] = all(
        report[key] is None or report[key] <= bound for key, bound in report["bounds"].items()
    )
    return report
