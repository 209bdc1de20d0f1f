"""Tests that pin the paper's equations where a plausible change would otherwise pass every other test:

- Eq. 11: the fusion is ``lambda * FG + (1 - lambda) * BG`` (not additive, lambda not swapped), wired from the config;
- Eq. 12: training regresses the noise ``eps`` (not ``x0``);
- the unconditional guidance branch gives BCCA the empty image (not the source, not nothing);
- Eq. 10: the background gate is the plain ``1 - M_union`` by default, the Eq. 8-faded one only when asked;
- Eq. 8: the two readings (``1 - s (1 - M)`` and the literal ``M * exp(-t/T)``) side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mcie.model.attention import MCIEAttentionInputs
from mcie.model.config import MCIEConfig
from mcie.model.masks import background_gate, box_coverage, foreground_weights
from tests.model.test_network import HW, _box_cells, _data, _inputs, _layer
from tests.model.tiny import TinyFiles, load_tiny_model, make_tiny_files, randomize_trained, tiny_config, tiny_images

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
NOISIEST = math.exp(-0.999)  # Eq. 8's strength at t = 999 of T = 1000


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], -1, x.shape[1] * x.shape[-1])


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


# --- Eq. 11 ---------------------------------------------------------------------------------------------------


def test_eq11_fusion_is_lambda_fg_plus_one_minus_lambda_bg() -> None:
    attn, processor = _layer()
    processor.lambda_fg = 0.8  # asymmetric, so a swapped lambda cannot pass
    hidden, text, context, background = _data()
    inputs = _inputs(0.6, context, background)
    out = processor(attn, hidden, text, mcie=inputs)
    # FG alone: the same processor without background tokens outputs to_out(FG) (no lambda involved)
    fg_out = processor(attn, hidden, text, mcie=_inputs(0.6, context, None))
    # BG by hand: attention of Q over BCCA's own keys/values, gated per position by Eq. 10
    q = _split(attn.to_q(hidden), attn.heads)
    k, v = _split(processor.to_k_bg(background), attn.heads), _split(processor.to_v_bg(background), attn.heads)
    bg = F.scaled_dot_product_attention(q, k, v) * inputs.background_gate(hidden.shape[1], q.dtype)
    bg_out = attn.to_out[0](_merge(bg))
    # to_out is affine and the weights sum to 1, so to_out(l FG + (1 - l) BG) = l to_out(FG) + (1 - l) to_out(BG)
    torch.testing.assert_close(out, 0.8 * fg_out + 0.2 * bg_out, atol=1e-5, rtol=1e-5)
    # and the two forms that must not pass are really different here: swapped lambda, additive FG + BG
    assert (out - (0.2 * fg_out + 0.8 * bg_out)).abs().amax() > 1e-3
    assert (out - (fg_out + bg_out - attn.to_out[0].bias)).abs().amax() > 1e-3


def test_eq11_lambda_comes_from_the_config(files: TinyFiles) -> None:
    from mcie.model.attention import cross_attention_processors

    model = load_tiny_model(files, tiny_config(lambda_fg=0.8))
    processors = cross_attention_processors(model.unet)
    assert processors and {p.lambda_fg for p in processors.values()} == {0.8}


# --- Eq. 12 ---------------------------------------------------------------------------------------------------


def test_eq12_training_regresses_the_added_noise(files: TinyFiles, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that predicts exactly the noise the scheduler added has loss 0; against x0 (or v) it would not."""
    from diffusers import DDPMScheduler

    from mcie.model.network import MCIEModel
    from mcie.model.train import train
    from mcie.model.train_config import TrainConfig
    from tests.model.test_train import tiny_config_data, write_jsonl_export

    seen: dict[str, torch.Tensor] = {}
    add_noise = DDPMScheduler.add_noise

    def recording_add_noise(self: Any, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Any:
        seen["noise"], seen["x0"] = noise.clone(), original.clone()
        return add_noise(self, original, noise, timesteps)

    def oracle(self: MCIEModel, noisy: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        anchor = sum(p.sum() for p in self.trainable_parameters()) * 0.0  # keeps the graph for backward()
        return seen["noise"].to(noisy.dtype) + anchor

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording_add_noise)
    monkeypatch.setattr(MCIEModel, "forward", oracle)
    data = tiny_config_data(files.base, files.vision, write_jsonl_export(tmp_path / "export"), tmp_path / "run")
    data["stages"] = [{**data["stages"][0], "steps": 1, "warmup_steps": 0}]
    result = train(TrainConfig.from_data(data), progress=False)
    assert result.losses[1] == 0.0
    assert F.mse_loss(seen["noise"], seen["x0"]).item() > 0.1  # an x0 target would have given this instead


# --- classifier-free guidance: the unconditional branch's BCCA input ------------------------------------------


def test_unconditional_branch_gets_the_empty_image_bcca_tokens(files: TinyFiles,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mcie.model.pipeline import MCIEPipeline

    model = load_tiny_model(files, tiny_config())
    randomize_trained(model)
    pipe = MCIEPipeline(model)
    calls: list[torch.Tensor] = []
    forward = model.forward

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs["background"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    image = tiny_images(1)[0]
    pipe([image], "edit", [[("add a kite", (0.0, 0.0, 0.5, 0.5))]], num_inference_steps=2, seed=0, output_type="np")
    background = calls[0]
    assert background.shape[0] == 3  # [text + image, image only, neither]
    pixels = pipe.image_processor.preprocess([image]).to(model.device)
    with torch.no_grad():
        source = model.encode_background(pixels)
        empty = model.encode_background(pixels, drop=torch.tensor([True]))
    torch.testing.assert_close(background[0:1], source)
    torch.testing.assert_close(background[1:2], source)
    torch.testing.assert_close(background[2:3], empty)  # the "no image" input, as in training's condition dropout
    assert (empty - source).abs().amax() > 1e-3
    with torch.no_grad():
        zeros = model.encode_background(torch.zeros_like(pixels))
    assert (empty - zeros).abs().amax() > 1e-4  # the empty *normalised* image, not a black one
    with torch.no_grad():  # B + 1 tower passes give what the tripled batch with the third dropped gives
        tripled = model.encode_background(torch.cat([pixels] * 3), drop=torch.tensor([False, False, True]))
    torch.testing.assert_close(model.guidance_background(pixels), tripled)


# --- Eq. 10 and Eq. 8 -----------------------------------------------------------------------------------------


def test_eq10_plain_gate_is_the_default_and_the_faded_one_an_option() -> None:
    masks = torch.tensor([[[1.0, 0.25, 0.0]]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    s = torch.tensor([NOISIEST])
    torch.testing.assert_close(background_gate(masks, valid, s), torch.tensor([[0.0, 0.75, 1.0]]))
    torch.testing.assert_close(background_gate(masks, valid, s, faded=True),
                               torch.tensor([[1 - NOISIEST, 1 - 0.25 * NOISIEST, 1.0]]))
    assert MCIEConfig().background_schedule == "plain"

    attn, processor = _layer()
    hidden, text, context, background = _data()
    union = box_coverage(torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]]), *HW).amax(dim=0).flatten()
    full = union == 1
    other = background + 2 * torch.randn_like(background)
    for faded in (False, True):
        out = processor(attn, hidden, text, mcie=_inputs(NOISIEST, context, background, background_faded=faded))
        changed = processor(attn, hidden, text, mcie=_inputs(NOISIEST, context, other, background_faded=faded))
        inside = (changed[:, full] - out[:, full]).abs().amax()
        # plain: even at the noisiest step BCCA's tokens do not reach inside the boxes; faded: at weight 1 - s
        assert (inside < 1e-6) if not faded else (inside > 1e-2)


def test_eq10_and_eq8_options_reach_the_processors(files: TinyFiles) -> None:
    model = load_tiny_model(files, tiny_config(background_schedule="faded", schedule_form="literal"))
    inputs = model.attention_inputs(torch.tensor([999]), (8, 8), 1, background=torch.zeros(1, 4, 32))
    assert isinstance(inputs, MCIEAttentionInputs)
    assert inputs.background_faded and inputs.schedule_form == "literal"
    plain = load_tiny_model(files, tiny_config()).attention_inputs(torch.tensor([999]), (8, 8), 1,
                                                                   background=torch.zeros(1, 4, 32))
    assert plain is not None and not plain.background_faded and plain.schedule_form == "strength"


def test_eq8_readings_side_by_side() -> None:
    masks = torch.tensor([[[1.0, 0.0]]])  # one box holding position 0 of 2
    valid = torch.ones(1, 1, dtype=torch.bool)
    for s in (NOISIEST, 0.5, 1.0):
        strength = torch.tensor([s])
        base, slot = foreground_weights(masks, valid, strength)
        lit_base, lit_slot = foreground_weights(masks, valid, strength, "literal")
        torch.testing.assert_close(slot[0, 0], torch.tensor([1.0, 1 - s]))  # 1 - s (1 - M)
        torch.testing.assert_close(lit_slot[0, 0], torch.tensor([s, 0.0]))  # M * exp(-t/T)
        torch.testing.assert_close(base, lit_base)  # 1 - s U under both
        torch.testing.assert_close(base[0], torch.tensor([1 - s, 1.0]))
    with pytest.raises(ValueError, match="schedule_form"):
        foreground_weights(masks, valid, torch.ones(1), "other")

    # in attention: under the literal reading a sub-instruction never reaches outside its box, even early
    attn, processor = _layer()
    hidden, text, context, _ = _data()
    perturbed = context.clone()
    perturbed[:, 0] += 3 * torch.randn_like(perturbed[:, 0])
    outside = ~_box_cells((0.0, 0.0, 0.5, 1.0))
    for form, reaches in (("strength", True), ("literal", False)):
        out = processor(attn, hidden, text, mcie=_inputs(NOISIEST, context, None, schedule_form=form))
        changed = processor(attn, hidden, text, mcie=_inputs(NOISIEST, perturbed, None, schedule_form=form))
        leak = (changed[:, outside] - out[:, outside]).abs().amax()
        assert (leak > 1e-3) if reaches else (leak < 1e-6), (form, leak)
