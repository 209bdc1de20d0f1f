"""Which images a sample's turn window shows: the one home of that idea for every stage.

A sample covers turns ``first..last`` of an instance. Its *source* is the image before turn ``first``: the
instance's source image when ``first`` is 1, else the result of turn ``first - 1``; then come the results of each
turn of the window, the last being the *target* and the others the *intermediates*. The conflict stage, the review
screen, the user study and the export records all read a window through :func:`window_images`; each decides what a
missing image means for it (:attr:`WindowImages.missing`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ImageAt = tuple[int, str | None]  # (after turn, sha256 or None when the instance lacks it); turn 0 is the source


@dataclass(frozen=True)
class WindowImages:
    source: ImageAt
    steps: tuple[ImageAt, ...]  # turns first..last, in order; the last one is the target

    @property
    def target(self) -> ImageAt:
        return self.steps[-1]

    @property
    def intermediates(self) -> tuple[ImageAt, ...]:
        return self.steps[:-1]

    @property
    def missing(self) -> list[int]:
        """The turns (0 for the instance's source) whose image is missing."""
        return [turn for turn, sha in (self.source, *self.steps) if sha is None]

    def shas(self) -> set[str]:
        return {sha for _, sha in (self.source, *self.steps) if sha is not None}


def window_turns(first: int, last: int) -> range:
    """The turn indexes whose result images a window shows (``first - 1`` stands for the source when it is 0)."""
    return range(first - 1, last + 1)


def window_images(
    instance_source: str | None, turn_results: Mapping[int, str | None], first: int, last: int
) -> WindowImages:
    """The window ``first..last`` given the instance's source image and its turns' result images (turn -> sha256)."""
    if not 1 <= first <= last:
        raise ValueError(f"a window needs 1 <= first <= last; got {first}..{last}")
    source = instance_source if first == 1 else turn_results.get(first - 1)
    return WindowImages((first - 1, source), tuple((t, turn_results.get(t)) for t in range(first, last + 1)))
