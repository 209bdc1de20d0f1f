"""Deterministic train/val assignment by instance, so windows of one instance never straddle the two splits.

The split of a sample depends only on its instance's ``(dataset, external_id)`` and the validation fraction: the
first 8 bytes of ``sha256(dataset + "\\0" + external_id)`` read as a number in [0, 1) below ``val_fraction`` is
``val``. Every sample of an instance (all its windows) therefore lands in the same split, in every export, whatever
the order or the rest of the selection; raising the fraction only moves instances from train to val.
"""

from __future__ import annotations

import hashlib
from typing import Literal

SplitName = Literal["train", "val"]
SPLITS: tuple[SplitName, ...] = ("train", "val")


def instance_unit(dataset: str, external_id: str) -> float:
    """The instance's position in [0, 1), uniform over instances and stable across exports."""
    digest = hashlib.sha256(f"{dataset}\0{external_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_for(dataset: str, external_id: str, val_fraction: float) -> SplitName:
    """``val`` for the instances whose unit falls below ``val_fraction``, else ``train``."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1; got {val_fraction!r}")
    return "val" if instance_unit(dataset, external_id) < val_fraction else "train"
