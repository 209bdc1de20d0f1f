"""MCIE-E1 network: masks and schedule, SACA/BCCA modules, the attention processors' masking, LoRA placement and
freezing, saving/loading the trained parts. Tiny random models only (``tests.model.tiny``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from mcie.model.attention import MCIEAttentionInputs, MCIEAttnProcessor, cross_attention_processors
from mcie.model.bcca import OpenClipPatchEncoder
from mcie.model.config import MCIEConfig
from mcie.model.masks import (
    box_coverage,
    box_raster,
    foreground_weights,
    latent_grid,
    mask_strength,
    masks_at,
    resize_pixel_masks,
    union_mask,
)
from mcie.model.network import MCIEModel, SubInstructionBatch
from mcie.model.saca import FourierBoxEmbedding, SpatialContext
from mcie.model.weights import CONFIG_NAME, WEIGHTS_NAME, WeightsError, load_weights, save_weights
from tests.model.tiny import TinyFiles, load_tiny_model, make_tiny_files, randomize_trained, tiny_config

# diffusers' Euler schedulers call np.array(tensor, copy=False) internally (numpy 2 deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# --- masks and schedule ---------------------------------------------------------------------------------------


def test_box_coverage_is_exact_area_fraction() -> None:
    box = torch.tensor([0.25, 0.0, 0.625, 0.5])  # x covers cells 1 (all), 2 (half) of 4; y covers rows 0, 1 of 4
    mask = box_coverage(box, 4, 4)
    expected_x = torch.tensor([0.0, 1.0, 0.5, 0.0])
    expected_y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(mask, expected_y[:, None] * expected_x[None, :])
    assert math.isclose(mask.sum().item() / 16, 0.375 * 0.5)


def test_area_masks_match_area_downsampled_pixel_masks() -> None:
    box = torch.tensor([[[0.1, 0.2, 0.7, 0.9]]])
    pixels = box_coverage(box, 64, 64)  # the box rasterised at pixel level
    for size in (16, 8):
        torch.testing.assert_close(masks_at(box, size, size, "area"), resize_pixel_masks(pixels, size, size, "area"))


def test_nearest_raster_never_loses_a_thin_box() -> None:
    thin = torch.tensor([0.50, 0.51, 0.52, 0.53])
    mask = box_raster(thin, 4, 4)
    assert mask.sum() == 1 and mask[2, 2] == 1
    big = box_raster(torch.tensor([0.0, 0.0, 0.5, 1.0]), 4, 4)
    assert big.sum() == 8 and big[:, :2].eq(1).all()
    pixel = torch.zeros(1, 1, 32, 32)
    pixel[..., 5, 5] = 1.0
    assert resize_pixel_masks(pixel, 4, 4, "nearest").sum() == 1


def test_union_ignores_padding_slots() -> None:
    masks = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    assert union_mask(masks, torch.tensor([[True, False]])).tolist() == [[1.0, 0.0, 0.0]]
    assert union_mask(masks[:, :0], torch.zeros(1, 0, dtype=torch.bool)).tolist() == [[0.0, 0.0, 0.0]]


def test_latent_grid_follows_the_unet_downsampling() -> None:
    assert latent_grid(64 * 48, (64, 48)) == (64, 48)
    assert latent_grid(32 * 24, (64, 48)) == (32, 24)
    assert latent_grid(3 * 4, (5, 7)) == (3, 4)  # ceil(5/2), ceil(7/2)
    with pytest.raises(ValueError, match="cannot place"):
        latent_grid(10, (8, 8))


def test_schedule_fades_with_t() -> None:
    t = torch.tensor([0.0, 250.0, 500.0, 999.0])
    strength = mask_strength(t, 1000)
    assert strength[0] == 1 and torch.all(strength[1:] < strength[:-1])
    assert math.isclose(strength[-1].item(), math.exp(-0.999), rel_tol=1e-5)
    assert mask_strength(t, 1000, enabled=False).eq(1).all()
    masks = torch.tensor([[[1.0, 0.0]]]).repeat(4, 1, 1)  # one box covering position 0 of 2
    base, slot = foreground_weights(masks, torch.ones(4, 1, dtype=torch.bool), strength)
    outside = slot[:, 0, 1]  # weight of the sub-instruction's tokens at a latent outside its box
    assert outside[0] == 0 and torch.all(outside[1:] > outside[:-1])
    assert slot[:, 0, 0].eq(1).all() and base[:, 1].eq(1).all() and base[0, 0] == 0


# --- SACA and BCCA modules ------------------------------------------------------------------------------------


def test_fourier_embedding_is_eq5() -> None:
    embed = FourierBoxEmbedding(3)
    out = embed(torch.tensor([[0.25, 0.5, 0.75, 1.0]]))
    assert out.shape == (1, 4, 6)
    x = 0.25
    expected = [math.sin(2 * math.pi * x * f) for f in (1, 2, 4)] + [math.cos(2 * math.pi * x * f) for f in (1, 2, 4)]
    torch.testing.assert_close(out[0, 0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_spatial_context_appends_distinct_spatial_tokens() -> None:
    torch.manual_seed(0)
    saca = SpatialContext(8, num_queries=2, num_layers=2, width=16, heads=2, num_freqs=4, ff_mult=2)
    text = torch.randn(2, 3, 5, 8)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.6, 0.6], [0.5, 0.5, 1.0, 1.0]]).repeat(2, 1, 1)
    context = saca(text, boxes)
    assert context.shape == (2, 3, 7, 8)
    torch.testing.assert_close(context[:, :, :5], text)
    spatial = context[0, :, 5:]
    assert (spatial[0] - spatial[1]).abs().max() > 1e-3 and (spatial[0] - spatial[2]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


def test_patch_encoder_returns_open_clip_patch_tokens(files: TinyFiles) -> None:
    from tests.tiny_clip import build_tiny_clip

    config = tiny_config()
    encoder = OpenClipPatchEncoder.from_checkpoint(
        config.clip_vision_model, files.vision, config.clip_vision_model_config, layer=-1
    )
    reference, _ = build_tiny_clip(0)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = encoder(pixels)
    assert tokens.shape == (2, 16, 32)  # (32 / 8) ** 2 patches of the tiny ViT, width 32
    reference.visual.output_tokens = True
    _, expected = reference.visual(encoder.preprocess(pixels))  # final tokens (after ln_post) of the same weights
    torch.testing.assert_close(reference.visual.ln_post(tokens), expected, atol=1e-5, rtol=1e-5)
    dropped = encoder(pixels, drop=torch.tensor([True, False]))
    torch.testing.assert_close(dropped[1], tokens[1])
    other = encoder(torch.rand(1, 3, 32, 32), drop=torch.tensor([True]))  # any dropped image is the empty one
    torch.testing.assert_close(dropped[0], other[0])
    assert (dropped[0] - tokens[0]).abs().amax() > 1e-3


def test_vision_checkpoint_errors_name_file_and_key(files: TinyFiles, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = tiny_config()
    state = load_file(str(files.vision))
    state.pop("visual.conv1.weight")
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(KeyError, match=r"broken\.safetensors.*conv1\.weight"):
        OpenClipPatchEncoder.from_checkpoint(config.clip_vision_model, broken, config.clip_vision_model_config)
    with pytest.raises(FileNotFoundError, match="absent"):
        OpenClipPatchEncoder.from_checkpoint(config.clip_vision_model, tmp_path / "absent.pt", None)


# --- the attention processor ----------------------------------------------------------------------------------

HW = (6, 8)  # a non-square level


def _layer(seed: int = 0) -> tuple[Attention, MCIEAttnProcessor]:
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    processor = MCIEAttnProcessor(16, 8, lambda_fg=0.5)
    with torch.no_grad():
        for p in processor.parameters():
            p.normal_(0, 0.5)
    return attn, processor


def _inputs(strength: float, context: torch.Tensor, background: torch.Tensor | None, **kw) -> MCIEAttentionInputs:
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 1.0]]]).repeat(2, 1, 1)
    valid = torch.tensor([[True, True, False], [True, True, False]])
    return MCIEAttentionInputs(
        latent_hw=HW, strength=torch.full((2,), strength), sub_context=context, sub_valid=valid, boxes=boxes,
        background=background, **kw,
    )


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, HW[0] * HW[1], 16, generator=g)
    text = torch.randn(2, 5, 8, generator=g)
    context = torch.randn(2, 3, 4, 8, generator=g)
    background = torch.randn(2, 3, 8, generator=g)
    return hidden, text, context, background


def _box_cells(box: tuple[float, float, float, float]) -> torch.Tensor:
    """(H*W,) bool: cells whose area touches ``box`` at the HW level."""
    return box_coverage(torch.tensor(box), *HW).flatten() > 0


def test_processor_without_inputs_is_attn_processor_2_0() -> None:
    attn, processor = _layer()
    hidden, text, _, _ = _data()
    expected = AttnProcessor2_0()(attn, hidden, text)
    assert torch.equal(processor(attn, hidden, text), expected)
    empty = MCIEAttentionInputs(latent_hw=HW, strength=torch.ones(2))
    assert torch.equal(processor(attn, hidden, text, mcie=empty), expected)


@pytest.mark.parametrize("mask_resize", ["area", "nearest"])
def test_sub_instruction_cannot_reach_outside_its_box_at_full_strength(mask_resize: str) -> None:
    attn, processor = _layer()
    hidden, text, context, _ = _data()
    out = processor(attn, hidden, text, mcie=_inputs(1.0, context, None, mask_resize=mask_resize))
    perturbed = context.clone()
    perturbed[:, 0] += 3 * torch.randn_like(perturbed[:, 0])
    changed = processor(attn, hidden, text, mcie=_inputs(1.0, perturbed, None, mask_resize=mask_resize))
    inside = _box_cells((0.0, 0.0, 0.5, 1.0))
    assert torch.allclose(changed[:, ~inside], out[:, ~inside], atol=1e-6)
    assert (changed[:, inside] - out[:, inside]).abs().amax() > 1e-2
    # early in denoising (t = T, strength exp(-1)) the mask is soft and sub-instruction 0 does reach outside
    weak = processor(attn, hidden, text, mcie=_inputs(math.exp(-1), context, None, mask_resize=mask_resize))
    weak_changed = processor(attn, hidden, text, mcie=_inputs(math.exp(-1), perturbed, None, mask_resize=mask_resize))
    assert (weak_changed[:, ~inside] - weak[:, ~inside]).abs().amax() > 1e-3


def test_padding_slots_and_base_text_outside_boxes() -> None:
    attn, processor = _layer()
    hidden, text, context, _ = _data()
    out = processor(attn, hidden, text, mcie=_inputs(1.0, context, None))
    perturbed = context.clone()
    perturbed[:, 2] += 5.0  # the padding slot (valid = False)
    assert torch.allclose(processor(attn, hidden, text, mcie=_inputs(1.0, perturbed, None)), out, atol=1e-6)
    # outside every box, at full strength, the foreground is plain cross-attention over the base text
    outside = ~(_box_cells((0.0, 0.0, 0.5, 1.0)) | _box_cells((0.5, 0.0, 1.0, 0.5)))
    assert outside.any()
    plain = AttnProcessor2_0()(attn, hidden, text)
    assert torch.allclose(out[:, outside], plain[:, outside], atol=1e-5)


def test_samples_without_sub_instructions_use_plain_attention() -> None:
    attn, processor = _layer()
    hidden, text, context, background = _data()
    both = _inputs(1.0, context, background)
    mixed = _inputs(1.0, context, background)
    mixed.sub_valid = torch.tensor([[True, True, False], [False, False, False]])
    out_both = processor(attn, hidden, text, mcie=both)
    out_mixed = processor(attn, hidden, text, mcie=mixed)
    torch.testing.assert_close(out_mixed[0], out_both[0])  # sample 0 is computed alike in either batch
    only_bg = MCIEAttentionInputs(latent_hw=HW, strength=torch.ones(2), background=background)
    torch.testing.assert_close(out_mixed[1], processor(attn, hidden, text, mcie=only_bg)[1])
    no_bg = _inputs(1.0, context, None)
    no_bg.sub_valid = mixed.sub_valid
    torch.testing.assert_close(processor(attn, hidden, text, mcie=no_bg)[1], AttnProcessor2_0()(attn, hidden, text)[1])


def test_background_branch_sees_nothing_inside_the_union() -> None:
    attn, processor = _layer()
    hidden, text, context, background = _data()
    out = processor(attn, hidden, text, mcie=_inputs(1.0, context, background))
    changed = processor(attn, hidden, text, mcie=_inputs(1.0, context, background + 2 * torch.randn_like(background)))
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]])
    union = box_coverage(boxes, *HW).amax(dim=0).flatten()
    full = union == 1
    assert full.any() and (~full).any()
    assert torch.allclose(changed[:, full], out[:, full], atol=1e-6)
    assert (changed[:, ~full] - out[:, ~full]).abs().amax() > 1e-2
    without = processor(attn, hidden, text, mcie=_inputs(1.0, context, None))
    assert (without - out).abs().amax() > 1e-2  # the background branch is fused in (Eq. 11)


def test_literal_mask_mode_does_not_block_attention() -> None:
    attn, processor = _layer()
    hidden, text, context, background = _data()
    out = processor(attn, hidden, text, mcie=_inputs(1.0, context, background, mask_mode="literal"))
    perturbed = context.clone()
    perturbed[:, 0] += 3 * torch.randn_like(perturbed[:, 0])
    changed = processor(attn, hidden, text, mcie=_inputs(1.0, perturbed, background, mask_mode="literal"))
    inside = _box_cells((0.0, 0.0, 0.5, 1.0))
    assert out.isfinite().all()
    assert (changed[:, ~inside] - out[:, ~inside]).abs().amax() > 1e-3


def test_processor_rejects_mismatched_inputs() -> None:
    _, _, context, _ = _data()
    with pytest.raises(ValueError, match="sub_valid"):
        MCIEAttentionInputs(latent_hw=HW, strength=torch.ones(2), sub_context=context, boxes=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="background: batch 3"):
        MCIEAttentionInputs(latent_hw=HW, strength=torch.ones(2), background=torch.zeros(3, 4, 8))


# --- the model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(files: TinyFiles) -> MCIEModel:
    return load_tiny_model(files, tiny_config())


def _batch(model: MCIEModel, seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    return {
        "noisy_latents": torch.randn(2, 4, 16, 16, generator=g),
        "timesteps": torch.tensor([0, 700]),
        "source_latents": model.encode_source_latents(pixels),
        "pixels": pixels,
        "instructions": ["add an apple and a pear", "make the sky red"],
        "texts": [["add an apple", "add a pear"], ["make the sky red"]],
        "boxes": [[(0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)], [None]],
    }


def _predict(model: MCIEModel, batch: dict, **overrides: object) -> torch.Tensor:
    sub = model.encode_sub_instructions(batch["texts"], batch["boxes"])
    kwargs = {"sub_instructions": sub, "background": model.encode_background(batch["pixels"])}
    kwargs.update(overrides)
    return model(batch["noisy_latents"], batch["timesteps"], batch["source_latents"], batch["instructions"], **kwargs)


def test_lora_only_on_self_attention_and_base_frozen(model: MCIEModel) -> None:
    from peft.tuners.lora import LoraLayer

    lora = [name for name, module in model.unet.named_modules() if isinstance(module, LoraLayer)]
    attn1 = [name for name, module in model.unet.named_modules() if name.endswith(".attn1")]
    assert attn1 and sorted(lora) == sorted(f"{a}.{p}" for a in attn1 for p in ("to_q", "to_k", "to_v", "to_out.0"))
    trained = set(model.trained_parameter_names())
    assert not any(".attn2." in n and ".processor." not in n for n in trained)
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (name in trained), name
    groups = {n.split(".")[0] for n in trained}
    assert groups == {"unet", "saca", "bcca"}
    assert any(".attn2.processor.to_k_sub" in n for n in trained)
    assert any(".attn2.processor.to_v_bg" in n for n in trained)
    assert len(cross_attention_processors(model.unet)) == 7  # 2 down + 4 up + 1 mid transformer blocks


def test_gradients_reach_exactly_the_trained_parts(files: TinyFiles) -> None:
    model = load_tiny_model(files, tiny_config(bcca_layers=1, saca_layers=1))
    batch = _batch(model)
    loss = _predict(model, batch).square().mean()
    loss.backward()
    trained = set(model.trained_parameter_names())
    for name, parameter in model.named_parameters():
        if name in trained and ".lora_A." not in name:  # LoRA B starts at zero, so A gets no gradient at first
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        if name not in trained:
            assert parameter.grad is None, name


def test_processors_without_inputs_keep_the_base_unet(files: TinyFiles, model: MCIEModel) -> None:
    base = load_tiny_model(files)  # plain InstructPix2Pix
    assert base.is_baseline and not cross_attention_processors(base.unet)
    batch = _batch(model)
    args = (batch["noisy_latents"], batch["timesteps"], batch["source_latents"], batch["instructions"])
    with torch.no_grad():
        assert torch.equal(model(*args), base(*args))  # LoRA B = 0 at init, processors fall back to AttnProcessor2_0


def test_forward_shapes_and_input_forms(files: TinyFiles) -> None:
    model = load_tiny_model(files, tiny_config())
    randomize_trained(model)
    batch = _batch(model)
    with torch.no_grad():
        eps = _predict(model, batch)
        assert eps.shape == (2, 4, 16, 16) and eps.isfinite().all()
        as_lists = model(
            batch["noisy_latents"], batch["timesteps"], batch["source_latents"], batch["instructions"],
            sub_instructions=batch["texts"], boxes=batch["boxes"],
            background=model.encode_background(batch["pixels"]),
        )
        torch.testing.assert_close(as_lists, eps)
        plain = model(batch["noisy_latents"], batch["timesteps"], batch["source_latents"], batch["instructions"])
        assert (plain - eps).abs().amax() > 1e-3
        sub = model.encode_sub_instructions(batch["texts"], batch["boxes"])
        assert sub.context.shape == (2, 2, 77 + 2, 32) and sub.valid.tolist() == [[True, True], [True, False]]
        dropped = SubInstructionBatch.cat([sub, sub.dropped()])
        assert dropped.valid[2:].any().item() is False and len(dropped) == 4
        background = model.encode_background(batch["pixels"])
        assert background.shape == (2, 4, 32)
        null = model.encode_background(batch["pixels"], drop=torch.tensor([True, True]))
        torch.testing.assert_close(null[0], null[1])
    with pytest.raises(ValueError, match="max_sub_instructions"):
        model.encode_sub_instructions([["a"] * 9], None)
    with pytest.raises(ValueError, match="2 sub-instructions but 1 boxes"):
        model.encode_sub_instructions([["a", "b"]], [[None]])


def test_condition_dropout_matches_the_guidance_branches(files: TinyFiles) -> None:
    model = load_tiny_model(files, tiny_config())
    randomize_trained(model)
    b = _batch(model)
    noisy, t, src, pixels = b["noisy_latents"], b["timesteps"], b["source_latents"], b["pixels"]
    drops = {"drop_text": torch.tensor([True, False]), "drop_image": torch.tensor([False, True])}
    with torch.no_grad():
        out = model(noisy, t, src, b["instructions"], b["texts"], b["boxes"], source_pixels=pixels, **drops)
        # sample 0: no text (empty prompt, no sub-instructions) but the image; sample 1: text, no image
        text_dropped = model(noisy[:1], t[:1], src[:1], [""], background=model.encode_background(pixels[:1]))
        sub = model.encode_sub_instructions(b["texts"][1:], b["boxes"][1:])
        null = model.encode_background(pixels[1:], drop=torch.tensor([True]))
        image_dropped = model(noisy[1:], t[1:], torch.zeros_like(src[1:]), b["instructions"][1:], sub, background=null)
        torch.testing.assert_close(out[0], text_dropped[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], image_dropped[0], atol=1e-5, rtol=1e-5)
        features = model.vision_features(pixels)
        text = model.encode_base_text(b["instructions"])
        via_features = model(noisy, t, src, text, b["texts"], b["boxes"], vision_features=features, **drops)
        torch.testing.assert_close(via_features, out, atol=1e-5, rtol=1e-5)
        kept = model(noisy, t, src, b["instructions"], b["texts"], b["boxes"], source_pixels=pixels)
        assert (out - kept).abs().amax() > 1e-3


def test_box_mask_replaces_the_rectangles(files: TinyFiles) -> None:
    model = load_tiny_model(files, tiny_config())
    randomize_trained(model)
    batch = _batch(model)
    rectangles = box_coverage(torch.tensor([[0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]), 32, 32)
    pixel_masks = torch.stack([rectangles, rectangles])
    with torch.no_grad():
        same = _predict(model, batch, box_mask=pixel_masks)
        torch.testing.assert_close(same[0], _predict(model, batch)[0], atol=1e-5, rtol=1e-5)
        other = _predict(model, batch, box_mask=torch.flip(pixel_masks, dims=[-1]))
        assert (other[0] - same[0]).abs().amax() > 1e-4


# --- weights --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(files: TinyFiles, tmp_path: Path) -> None:
    model = load_tiny_model(files, tiny_config())
    randomize_trained(model)
    folder = save_weights(model, tmp_path / "w")
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])
    loaded = load_tiny_model(files, weights=folder, seed=123)
    assert loaded.config == model.config
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(_predict(loaded, batch), _predict(model, batch))
    fresh = load_tiny_model(files, tiny_config(), seed=123)
    with torch.no_grad():
        assert (_predict(fresh, batch) - _predict(model, batch)).abs().amax() > 1e-3


def test_weights_errors_name_file_and_key(files: TinyFiles, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = load_tiny_model(files, tiny_config())
    folder = save_weights(model, tmp_path / "w")
    path = folder / WEIGHTS_NAME
    state = load_file(str(path))
    key = next(k for k in state if k.startswith("saca."))

    save_file({**state, "saca.extra": torch.zeros(1)}, str(path))
    with pytest.raises(WeightsError, match=r"mcie_e1\.safetensors: unexpected key 'saca\.extra'"):
        load_weights(model, folder)
    save_file({k: v for k, v in state.items() if k != key}, str(path))
    with pytest.raises(WeightsError, match=rf"missing key '{key}'"):
        load_weights(model, folder)
    save_file({**state, key: torch.zeros(*state[key].shape, 2)}, str(path))
    with pytest.raises(WeightsError, match=rf"key '{key}' has shape"):
        load_weights(model, folder)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"mcie_e1\.safetensors"):
        load_weights(model, folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"mcie_config\.json"):
        MCIEModel.from_pretrained(files.base, weights=folder, vision_checkpoint=files.vision)
    with pytest.raises(FileNotFoundError, match="missing the unet/ folder"):
        MCIEModel.from_pretrained(tmp_path)


def test_config_json_round_trip_and_errors(tmp_path: Path) -> None:
    config = tiny_config(lambda_fg=0.3, mask_resize="nearest")
    path = config.save(tmp_path / "c.json")
    assert MCIEConfig.load(path) == config
    data = json.loads(path.read_text())
    data["lambda_fg"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"c\.json.*lambda_fg"):
        MCIEConfig.load(path)
    with pytest.raises(ValueError, match="saca_width"):
        MCIEConfig(saca_width=10, saca_heads=3)
    defaults = MCIEConfig()
    assert (defaults.saca_queries, defaults.saca_layers, defaults.bcca_queries, defaults.bcca_layers) == (2, 2, 16, 4)
