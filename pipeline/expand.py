"""Turn one n-turn editing instance into complex-instruction samples (MCIE paper, 3.1 "Data Preparation").

Every contiguous window of 2..n turns becomes one sample: its source image is the image before the window's
first turn, its target the image after its last turn, and its instruction the window's turn instructions
joined into one natural sentence. A 4-turn instance gives three 2-, two 3- and one 4-instruction window.

Each turn instruction is also labelled with the operation it performs (ADD / REMOVE / CHANGE, paper 3.2) by
a small, transparent rule-based classifier. Everything here is pure and cheap (precompiled regexes, each
turn cleaned and classified once) because it runs over ~150k windows of the whole corpus.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

Operation = Literal["add", "remove", "change"]

__all__ = [
    "Operation",
    "SubInstruction",
    "WindowPlan",
    "classify_operation",
    "clean_instruction",
    "combine_instructions",
    "plan_samples",
    "windows",
]


# --- windows -------------------------------------------------------------------------------------------


def windows(n: int) -> list[tuple[int, int]]:
    """All contiguous windows of 2..n turns of an n-turn instance, as 1-based inclusive (first, last).

    Order is stable: by window length, then by first turn, e.g. for n=4
    (1,2) (2,3) (3,4) (1,3) (2,4) (1,4). There are n(n-1)/2 of them; n < 2 gives none.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"windows(n): expected the number of turns as an int, got {n!r}")
    if n < 0:
        raise ValueError(f"windows(n): expected a number of turns >= 0, got {n}")
    return [(first, first + length - 1) for length in range(2, n + 1) for first in range(1, n - length + 2)]


# --- combining instructions ------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s.,;:!]+$")
_LEADING = re.compile(r"^[\s,;:.\-]+")


def clean_instruction(text: str) -> str:
    """One turn's instruction tidied for joining: whitespace collapsed, leading/trailing punctuation dropped.

    Letter case is left alone (see :func:`combine_instructions`). Raises ``ValueError`` if nothing is left.
    """
    if not isinstance(text, str):
        raise TypeError(f"instruction: expected a string, got {type(text).__name__}")
    cleaned = _LEADING.sub("", _TRAILING.sub("", _SPACES.sub(" ", text)))
    if not cleaned:
        raise ValueError(f"instruction: expected some text, got {text!r}")
    return cleaned


def _lower_first(text: str) -> str:
    """Lower-case the first letter when the first word is an ordinary capitalised word.

    Kept as is: "I" / "I'd", acronyms ("TV", "USA") and mixed-case names ("iPhone", "McDonald's"), i.e.
    any first word that has an upper-case letter after its first character or is the pronoun I.
    """
    first_word = text.split(" ", 1)[0]
    if not first_word[:1].isupper():
        return text
    letters = first_word.rstrip(".,;:!?'\"")
    if letters in ("I",) or letters.startswith(("I'", "I’")):
        return text
    if any(c.isupper() for c in first_word[1:]):
        return text
    return text[0].lower() + text[1:]


def _upper_first(text: str) -> str:
    return text[0].upper() + text[1:] if text[:1].islower() else text


def _join(cleaned: Sequence[str]) -> str:
    parts = [_upper_first(cleaned[0]), *(_lower_first(t) for t in cleaned[1:])]
    if len(parts) == 1:
        body = parts[0]
    elif len(parts) == 2:
        body = f"{parts[0]} and {parts[1]}"
    else:
        body = ", ".join(parts[:-1]) + ", and " + parts[-1]
    return body + "."


def combine_instructions(texts: Sequence[str]) -> str:
    """Join turn instructions into one complex instruction sentence.

    Each part is cleaned (:func:`clean_instruction`); the first is capitalised, the later ones start with a
    lower-case letter unless their first word is "I", an acronym or a mixed-case name. Two parts are joined
    with " and ", three or more as a list with a serial comma ("A, B, and C"), and the sentence ends with
    a period: ``["Add a hat.", "Remove the car"]`` -> ``"Add a hat and remove the car."``.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("combine_instructions: expected a non-empty sequence of instruction strings")
    cleaned = []
    for i, text in enumerate(texts):
        try:
            cleaned.append(clean_instruction(text))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"instruction {i + 1}: {exc}") from None
    return _join(cleaned)


# --- operation classifier ----------------------------------------------------------------------------------
#
# Rules, in order:
#   1. A (non-negated) replacement phrase anywhere -> "change": replace/swap/substitute/exchange X (with Y),
#      "instead of", "in place of", "in its place".
#   2. Otherwise the earliest non-negated *strong* cue wins: add cues (add, put, place, insert, include,
#      attach, draw/paint a ..., "there should be", "let there be", give ... a ..., wear/hold a ...),
#      remove cues (remove, delete, erase, eliminate, take ... away/out/off, get rid of, disappear, vanish,
#      "there should be no", "no more", keep/leave only ...) and explicit change verbs (change, turn ...
#      into, convert, transform, recolour, move, swap ...). Weak verbs (make, let, have, turn without
#      "into") are not cues, so "make the dog disappear" is a removal and "make the sky blue" a change.
#   3. Otherwise a "without <noun>" phrase -> "remove" ("the same room without the chair").
#   4. Otherwise "change" (the default for attribute, style, colour and other edits).
# A cue is negated when one of "don't, do not, never, not, no need to, without, avoid, instead of" comes
# right before it (at most one word between), e.g. "add a hat without removing the hair" -> add.


def _forms(*stems: str) -> str:
    return "|".join(stems)


_ADD_CUES = [
    _forms(
        r"add(?:s|ed|ing)?",
        r"insert(?:s|ed|ing)?",
        r"include(?:s|d)?",
        r"including",
        r"attach(?:es|ed|ing)?",
        r"append(?:s|ed|ing)?",
        r"introduce(?:s|d)?",
        r"introducing",
        r"decorate(?:s|d)?",
        r"decorating",
        r"hang(?:s|ing)?",
        r"sprinkle(?:s|d)?",
        r"scatter(?:s|ed)?",
    ),
    r"put(?:s|ting)?(?!\s+(?:away|out|off|down\s+the\s+(?:light|lamp))\b)",
    r"(?<!the )(?<!a )(?<!an )(?<!in )(?<!of )(?<!this )(?<!that )(?<!another )(?<!same )"
    r"(?:place[sd]?|placing)",
    r"(?:draw|paint|sketch|stick)(?:s|ed|ing)?\s+(?:a|an|some|one|two|three|four|five|several|many|more)\b",
    r"there\s+(?:should|must|needs?\s+to|has\s+to|have\s+to|will|shall)\s+be\s+(?!no\b|nothing\b|none\b)",
    r"let\s+there\s+be\s+(?!no\b|nothing\b)",
    r"give(?:s|n)?(?:\s+\w+){0,3}?\s+(?:a|an|some)\s+"
    r"(?!(?:new|different)\b)(?!(?:\w+\s+)?(?:look|feel|style|tone|effect|filter|vibe|appearance|"
    r"makeover|color|colour|texture|finish|mood|atmosphere|touch)\b)",
    r"(?:wear|hold)(?:s|ing)?\s+(?:a|an|some)\b",
    r"wear(?:s|ing)?\s+(?!the\b|it\b|its\b|his\b|her\b|their\b|out\b|off\b|down\b)",
    r"bring(?:s|ing)?\s+in",
]

_REMOVE_CUES = [
    _forms(
        r"remov(?:e|es|ed|ing|al)",
        r"delet(?:e|es|ed|ing)",
        r"eras(?:e|es|ed|ing)",
        r"eliminat(?:e|es|ed|ing)",
        r"disappear(?:s|ed|ing)?",
        r"vanish(?:es|ed|ing)?",
        r"exclude(?:s|d)?",
        r"excluding",
    ),
    r"get(?:ting)?\s+rid\s+of",
    r"rid\s+of",
    r"take(?:s|n)?(?:\s+(?!away\b|out\b|off\b)\w+){0,5}?\s+(?:away|out|off)\b",
    r"taking(?:\s+(?!away\b|out\b|off\b)\w+){0,5}?\s+(?:away|out|off)\b",
    r"(?:wipe[sd]?|wiping|cut(?:s|ting)?|crop(?:s|ped|ping)?|edit(?:s|ed|ing)?|clear(?:s|ed|ing)?|"
    r"clean(?:s|ed|ing)?)"
    r"\s+(?:\w+\s+){0,4}?(?:out|away|off)\b",
    r"clear(?:s|ed|ing)?\s+(?:the|all|everything)\b",
    r"put(?:s|ting)?\s+away",
    r"there\s+(?:should|must|needs?\s+to|has\s+to)\s+be\s+(?:no|nothing|none)\b",
    r"there\s+(?:shouldn'?t|should\s+not|mustn'?t|must\s+not)\s+be",
    r"let\s+there\s+be\s+no\b",
    r"no\s+(?:more|longer)\b",
    r"(?:keep|leave)(?:s|ing)?\s+only\b",
    r"(?:make|leave)(?:s|ing)?\s+(?:\w+\s+){1,4}?empty",
    r"empty(?:ing)?\s+the",
    r"go(?:es)?\s+away",
    r"be\s+gone",
    r"lose\s+the",
]

_CHANGE_CUES = [
    _forms(
        r"chang(?:e|es|ed|ing)",
        r"convert(?:s|ed|ing)?",
        r"transform(?:s|ed|ing)?",
        r"recolou?r(?:s|ed|ing)?",
        r"alter(?:s|ed|ing)?",
        r"modif(?:y|ies|ied|ying)",
        r"mov(?:e|es|ed|ing)",
        r"switch(?:es|ed|ing)?",
        r"swap(?:s|ped|ping)?",
        r"replac(?:e|es|ed|ing)",
        r"substitut(?:e|es|ed|ing)",
        r"exchang(?:e|es|ed|ing)",
        r"rotat(?:e|es|ed|ing)",
        r"resiz(?:e|es|ed|ing)",
        r"enlarg(?:e|es|ed|ing)",
        r"shrink(?:s|ing)?",
        r"flip(?:s|ped|ping)?",
    ),
    r"turn(?:s|ed|ing)?(?:\s+\w+){0,5}?\s+into",
]

_REPLACE_CUES = [
    _forms(
        r"replac(?:e|es|ed|ing)",
        r"swap(?:s|ped|ping)?",
        r"substitut(?:e|es|ed|ing)",
        r"exchang(?:e|es|ed|ing)",
    ),
    r"instead\s+of",
    r"in\s+(?:the\s+)?place\s+of",
    r"in\s+(?:its|their|his|her)\s+place",
]


def _compile(cues: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(f"(?:{c})" for c in cues) + r")\b")


_ADD = _compile(_ADD_CUES)
_REMOVE = _compile(_REMOVE_CUES)
_CHANGE = _compile(_CHANGE_CUES)
_REPLACE = _compile(_REPLACE_CUES)
_WITHOUT = re.compile(r"\bwithout\s+(?!\w+ing\b)(?!any\s+change)")
_NEGATION = re.compile(
    r"\b(?:don'?t|do\s+not|does\s+not|doesn'?t|never|not|no\s+need\s+to|without|avoid|instead\s+of)"
    r"\s+(?:\w+\s+)?$"
)
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"'})


def _first_cue(pattern: re.Pattern[str], text: str) -> int | None:
    """Start of the first match of ``pattern`` in ``text`` that is not negated, or None."""
    for match in pattern.finditer(text):
        start = match.start()
        if not _NEGATION.search(text, max(0, start - 24), start):
            return start
    return None


def classify_operation(text: str) -> Operation:
    """The operation ("add", "remove" or "change") one edit instruction performs (rules above)."""
    if not isinstance(text, str):
        raise TypeError(f"instruction: expected a string, got {type(text).__name__}")
    lowered = _SPACES.sub(" ", text.translate(_QUOTES).lower()).strip()
    if _first_cue(_REPLACE, lowered) is not None:
        return "change"
    found: list[tuple[int, int, Operation]] = []
    for rank, (pattern, operation) in enumerate(((_CHANGE, "change"), (_REMOVE, "remove"), (_ADD, "add"))):
        start = _first_cue(pattern, lowered)
        if start is not None:
            found.append((start, rank, operation))
    if found:
        return min(found)[2]
    if _first_cue(_WITHOUT, lowered) is not None:
        return "remove"
    return "change"


# --- sample plans ------------------------------------------------------------------------------------------


class SubInstruction(NamedTuple):
    """One turn inside a window: its 1-based turn index, cleaned instruction text and operation."""

    turn_index: int
    text: str
    operation: Operation


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """One complex-instruction sample planned from turns ``first_turn..last_turn`` (1-based, inclusive).

    The source image is the image before ``first_turn``, the target the image after ``last_turn``.
    """

    first_turn: int
    last_turn: int
    instruction: str
    sub_instructions: tuple[SubInstruction, ...]

    @property
    def n_turns(self) -> int:
        return self.last_turn - self.first_turn + 1


def plan_samples(instructions: Sequence[str]) -> list[WindowPlan]:
    """Plan every window sample of one instance, given its per-turn instructions in turn order.

    Each turn is cleaned and classified once; window order is that of :func:`windows`. A blank or
    non-string instruction raises ``ValueError`` naming its (1-based) turn.
    """
    if isinstance(instructions, str):
        raise TypeError("plan_samples: expected a sequence of per-turn instructions, got a single string")
    turns: list[SubInstruction] = []
    for i, text in enumerate(instructions, start=1):
        try:
            cleaned = clean_instruction(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"turn {i}: {exc}") from None
        turns.append(SubInstruction(i, cleaned, classify_operation(cleaned)))
    plans = []
    for first, last in windows(len(turns)):
        subs = tuple(turns[first - 1 : last])
        plans.append(WindowPlan(first, last, _join([s.text for s in subs]), subs))
    return plans
