"""Tests of window expansion, instruction combining and the rule-based operation classifier."""

from __future__ import annotations

import pytest

from mcie.pipeline.expand import (
    SubInstruction,
    WindowPlan,
    classify_operation,
    clean_instruction,
    combine_instructions,
    plan_samples,
    windows,
)

# --- windows ------------------------------------------------------------------------------------------------


def test_four_turns_give_three_two_one_windows_in_stable_order() -> None:
    assert windows(4) == [(1, 2), (2, 3), (3, 4), (1, 3), (2, 4), (1, 4)]


@pytest.mark.parametrize("n", range(0, 12))
def test_window_count_and_shape(n: int) -> None:
    got = windows(n)
    assert len(got) == n * (n - 1) // 2
    assert len(set(got)) == len(got)
    for first, last in got:
        assert 1 <= first < last <= n
    # every contiguous span of >= 2 turns appears
    assert set(got) == {(a, b) for a in range(1, n + 1) for b in range(a + 1, n + 1)}
    assert [b - a for a, b in got] == sorted(b - a for a, b in got)


@pytest.mark.parametrize("bad", [-1, 2.0, "3", True])
def test_windows_rejects_bad_n(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match="windows"):
        windows(bad)  # type: ignore[arg-type]


# --- combining ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["Add a hat."], "Add a hat."),
        (["add a red hat to the man.", "Remove the car"], "Add a red hat to the man and remove the car."),
        (
            ["  Make the sky   blue. ", "Remove the bird..", "Put a TV on the wall!"],
            "Make the sky blue, remove the bird, and put a TV on the wall.",
        ),
        (["Remove the dog", "TV should be turned off"], "Remove the dog and TV should be turned off."),
        (["Remove the dog", "I want a cat instead"], "Remove the dog and I want a cat instead."),
        (["Remove the dog", "iPhone on the table"], "Remove the dog and iPhone on the table."),
        (
            ["Remove the dog", "McDonald's sign in the back"],
            "Remove the dog and McDonald's sign in the back.",
        ),
        (["Make it snow;", "Change the road, to gravel"], "Make it snow and change the road, to gravel."),
    ],
)
def test_combine_instructions(texts: list[str], expected: str) -> None:
    assert combine_instructions(texts) == expected


def test_combine_rejects_empty_parts_naming_them() -> None:
    with pytest.raises(ValueError, match="instruction 2"):
        combine_instructions(["Add a hat", "  . "])
    with pytest.raises(ValueError, match="non-empty"):
        combine_instructions([])
    with pytest.raises(ValueError, match="non-empty"):
        combine_instructions("Add a hat")


def test_clean_instruction_keeps_case_and_inner_punctuation() -> None:
    assert clean_instruction("\tReplace the U.S. flag.\n") == "Replace the U.S. flag"


# --- operation classifier ----------------------------------------------------------------------------------

CASES: list[tuple[str, str]] = [
    # add
    ("Add a red hat to the man", "add"),
    ("add a rainbow in the sky", "add"),
    ("Put a cup of coffee on the table", "add"),
    ("Place a vase of flowers on the windowsill", "add"),
    ("Insert a cat sitting on the sofa", "add"),
    ("include a sailboat in the distance", "add"),
    ("There should be a dog next to the girl", "add"),
    ("let there be fireworks in the night sky", "add"),
    ("Give the man a beard", "add"),
    ("Make the woman wear a pair of sunglasses", "add"),
    ("have the boy hold an umbrella", "add"),
    ("Draw a smiley face on the wall", "add"),
    ("Adding some snow on the roof", "add"),
    ("Add a hat without changing the face", "add"),
    ("Decorate the cake with strawberries", "add"),
    ("put a bird on the branch and make it blue", "add"),
    ("Have the dog wear sunglasses", "add"),
    ("the woman should be holding a bouquet", "add"),
    # remove
    ("Remove the car from the street", "remove"),
    ("delete the person on the left", "remove"),
    ("Erase the text on the sign", "remove"),
    ("Take away the chairs", "remove"),
    ("take the glasses off the man", "remove"),
    ("Get rid of the clouds", "remove"),
    ("eliminate the power lines", "remove"),
    ("The same room without the chair", "remove"),
    ("Make the dog disappear", "remove"),
    ("There should be no people on the beach", "remove"),
    ("There shouldn't be any cars", "remove"),
    ("let the boat vanish", "remove"),
    ("Clear the table", "remove"),
    ("crop out the man in the background", "remove"),
    ("Keep only the largest tree", "remove"),
    ("No more snow on the ground", "remove"),
    ("Don't add anything, just remove the lamp", "remove"),
    ("Put away the toys", "remove"),
    ("make the table empty", "remove"),
    # change
    ("Make the sky blue", "change"),
    ("Change the color of the car to red", "change"),
    ("Replace the dog with a cat", "change"),
    ("replace the sandwich with a pizza", "change"),
    ("Turn the man into a statue", "change"),
    ("make it look like a Van Gogh painting", "change"),
    ("Swap the apple for an orange", "change"),
    ("Recolour the door green", "change"),
    ("Make the building taller", "change"),
    ("it should be night time", "change"),
    ("Let the grass be yellow", "change"),
    ("Remove the dog and put a cat in its place", "change"),
    ("Put a cat instead of the dog", "change"),
    ("Give the photo a vintage look", "change"),
    ("give her a new hairstyle", "change"),
    ("Do not remove the tree, just make it orange", "change"),
    ("move the lamp to the other side of the place", "change"),
    ("Make the road wet without adding puddles", "change"),
    ("Change the background to a beach and add a palm tree", "change"),
    ("Turn the lights off", "change"),
    ("Paint the fence white", "change"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_classify_operation(text: str, expected: str) -> None:
    assert classify_operation(text) == expected


def test_table_is_large_and_covers_every_operation() -> None:
    assert len(CASES) >= 40
    assert {op for _, op in CASES} == {"add", "remove", "change"}


def test_classify_is_case_and_quote_insensitive() -> None:
    assert classify_operation("DON’T ADD ANYTHING, REMOVE THE LAMP") == "remove"
    assert classify_operation("  add   a   hat  ") == "add"


def test_word_boundaries() -> None:
    # "address", "removed" inside other words, "replacement" is not "place"
    assert classify_operation("Make the address on the envelope bold") == "change"
    assert classify_operation("make the output brighter") == "change"
    assert classify_operation("Change the fireplace to a brick one") == "change"


# --- plans --------------------------------------------------------------------------------------------------


def test_plan_samples_four_turns() -> None:
    plans = plan_samples(["Add a hat.", "remove the car", "Make the sky blue", "Put a dog on the grass"])
    assert [(p.first_turn, p.last_turn) for p in plans] == windows(4)
    whole = plans[-1]
    assert isinstance(whole, WindowPlan)
    assert whole.n_turns == 4
    assert whole.instruction == "Add a hat, remove the car, make the sky blue, and put a dog on the grass."
    assert whole.sub_instructions == (
        SubInstruction(1, "Add a hat", "add"),
        SubInstruction(2, "remove the car", "remove"),
        SubInstruction(3, "Make the sky blue", "change"),
        SubInstruction(4, "Put a dog on the grass", "add"),
    )
    middle = plans[1]
    assert (middle.first_turn, middle.last_turn) == (2, 3)
    assert middle.instruction == "Remove the car and make the sky blue."
    assert [s.turn_index for s in middle.sub_instructions] == [2, 3]
    assert middle.sub_instructions[0] == (2, "remove the car", "remove")  # a plain tuple too


def test_plan_samples_is_frozen_and_short_instances_give_nothing() -> None:
    assert plan_samples(["Add a hat"]) == []
    assert plan_samples([]) == []
    plan = plan_samples(["Add a hat", "Remove it"])[0]
    with pytest.raises(AttributeError):
        plan.instruction = "x"  # type: ignore[misc]


def test_plan_samples_names_bad_turn() -> None:
    with pytest.raises(ValueError, match="turn 3"):
        plan_samples(["Add a hat", "Remove the car", "   "])
    with pytest.raises(ValueError, match="turn 2"):
        plan_samples(["Add a hat", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single string"):
        plan_samples("Add a hat")
