"""MCIEPipeline: plain-InstructPix2Pix equivalence with diffusers, determinism, batches, decomposition, weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mcie.model.pipeline import MCIEPipeline, parse_sub_instruction
from mcie.model.weights import save_weights
from tests.model.tiny import TinyFiles, load_tiny_model, make_tiny_files, randomize_trained, tiny_config, tiny_images

STEPS = 3
SUBS = [
    [("add a red apple", "add", (0.0, 0.5, 0.5, 1.0)), ("remove the cup", "remove", (0.5, 0.0, 1.0, 0.5))],
    [("make the sky purple", "change", None)],
]


# diffusers' Euler schedulers call np.array(tensor, copy=False) internally (numpy 2 deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(files: TinyFiles) -> MCIEPipeline:
    model = load_tiny_model(files, tiny_config())
    randomize_trained(model)
    return MCIEPipeline(model)


def test_plain_model_matches_diffusers_instruct_pix2pix(files: TinyFiles) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    ours = MCIEPipeline.from_pretrained(files.base)
    assert ours.model.is_baseline
    reference = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        files.base, safety_checker=None, requires_safety_checker=False
    )
    reference.set_progress_bar_config(disable=True)
    images, prompts = tiny_images(2), ["make it red", "add a dog"]
    for guidance, image_guidance in ((7.5, 1.5), (1.0, 1.0)):
        expected = reference(
            prompts, image=images, num_inference_steps=STEPS, guidance_scale=guidance,
            image_guidance_scale=image_guidance, generator=torch.Generator().manual_seed(0), output_type="np",
        ).images
        got = ours(
            images, prompts, num_inference_steps=STEPS, guidance_scale=guidance, image_guidance_scale=image_guidance,
            seed=0, output_type="np",
        ).images
        np.testing.assert_allclose(got, expected, atol=1e-6)
    # a plain model ignores sub-instructions and needs no decompose step
    with_subs = ours(images, prompts, sub_instructions=SUBS, num_inference_steps=STEPS, seed=0, output_type="np")
    plain = ours(images, prompts, num_inference_steps=STEPS, seed=0, output_type="np")
    np.testing.assert_array_equal(with_subs.images, plain.images)


def test_seeded_runs_are_deterministic(pipe: MCIEPipeline) -> None:
    images = tiny_images(1)
    run = lambda seed: pipe(  # noqa: E731
        images, "add an apple and remove the cup", SUBS[:1], num_inference_steps=STEPS, seed=seed, output_type="np"
    ).images
    first, again, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    assert first.shape == (1, 32, 32, 3)


def test_a_batch_equals_its_images_edited_one_by_one(pipe: MCIEPipeline) -> None:
    images = tiny_images(2, seed=3)
    instructions = ["add a red apple and remove the cup", "make the sky purple"]
    batch = pipe(
        images, instructions, SUBS, num_inference_steps=STEPS, output_type="np",
        generator=[torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)],
    )
    assert [len(s) for s in batch.sub_instructions] == [2, 1]
    for i in range(2):
        single = pipe(
            images[i], instructions[i], SUBS[i], num_inference_steps=STEPS, output_type="np",
            generator=[torch.Generator().manual_seed(10 + i)],
        )
        np.testing.assert_allclose(batch.images[i], single.images[0], atol=2e-5)
    pil = pipe(images, instructions, SUBS, num_inference_steps=STEPS, seed=0).images
    assert len(pil) == 2 and pil[0].size == (32, 32)


def test_boxes_and_background_change_the_edit(pipe: MCIEPipeline) -> None:
    images = tiny_images(1)
    edit = lambda subs: pipe(images, "edit", subs, num_inference_steps=STEPS, seed=0, output_type="np").images  # noqa: E731
    left = edit([("add a red apple", (0.0, 0.0, 0.5, 1.0))])
    right = edit([("add a red apple", (0.5, 0.0, 1.0, 1.0))])
    assert np.abs(left - right).max() > 1e-3
    assert np.abs(edit([]) - left).max() > 1e-3


def test_decompose_is_called_without_sub_instructions(pipe: MCIEPipeline) -> None:
    calls: list[tuple[tuple[int, int], str]] = []

    def decompose(image, instruction):  # the MLLM step's signature
        calls.append((image.size, instruction))
        return [("add a red apple", "add", (0.0, 0.5, 0.5, 1.0)), ("remove the cup", "remove", None)]

    images = tiny_images(2)
    pipe.decompose = decompose
    try:
        instructions = ["a complex instruction", "another one"]
        out = pipe(images, instructions, num_inference_steps=STEPS, seed=0, output_type="np")
        subs = [decompose(image, "x") for image in images]
        given = pipe(images, instructions, subs, num_inference_steps=STEPS, seed=0, output_type="np")
    finally:
        pipe.decompose = None
    assert calls[:2] == [((32, 32), "a complex instruction"), ((32, 32), "another one")]
    assert out.sub_instructions[0] == [("add a red apple", (0.0, 0.5, 0.5, 1.0)), ("remove the cup", None)]
    np.testing.assert_array_equal(out.images, given.images)
    with pytest.raises(ValueError, match="decompose"):
        pipe(images, "a complex instruction", num_inference_steps=STEPS, seed=0)


def test_saved_weights_give_the_same_edit(pipe: MCIEPipeline, files: TinyFiles, tmp_path: Path) -> None:
    folder = save_weights(pipe.model, tmp_path / "weights")
    loaded = MCIEPipeline.from_pretrained(files.base, weights=folder, vision_checkpoint=files.vision)
    images = tiny_images(1)
    args = {"num_inference_steps": STEPS, "seed": 0, "output_type": "np"}
    np.testing.assert_array_equal(
        loaded(images, "edit", SUBS[:1], **args).images, pipe(images, "edit", SUBS[:1], **args).images
    )


def test_sub_instruction_forms() -> None:
    @dataclass
    class SubEdit:  # the shape of mcie.mllm.decompose.SubEdit
        instruction: str
        operation: str
        box: tuple[float, float, float, float] | None

    expected = ("add a cat", (0.1, 0.2, 0.3, 0.4))
    assert parse_sub_instruction(("add a cat", (0.1, 0.2, 0.3, 0.4))) == expected
    assert parse_sub_instruction(["add a cat", "add", [0.1, 0.2, 0.3, 0.4]]) == expected
    assert parse_sub_instruction({"text": "add a cat", "box": (0.1, 0.2, 0.3, 0.4)}) == expected
    assert parse_sub_instruction(SubEdit("add a cat", "add", (0.1, 0.2, 0.3, 0.4))) == expected
    assert parse_sub_instruction(("make it sunny", None)) == ("make it sunny", None)
    with pytest.raises(ValueError, match="x0 < x1"):
        parse_sub_instruction(("bad", (0.5, 0.0, 0.2, 1.0)), "item 3")
    with pytest.raises(ValueError, match="normalised"):
        parse_sub_instruction(("bad", (0, 0, 512, 512)))
