"""Benchmark: MCIE-E1's time per denoising step over plain InstructPix2Pix, for 1-4 sub-instructions; one JSON.

A "step" is one UNet evaluation of the classifier-free-guidance batch (3 x the image batch), as in the pipeline:
baseline = the diffusers UNet with its default processors; MCIE-E1 = the same weights with the MCIE processors,
SACA contexts and BCCA tokens and the attn1 LoRA (unmerged, as in training; ``mcie_lora_merged`` merges it as an
inference deployment would).

What MCIE-E1 adds once per edit is its own line, ``encode_per_edit``, warmed up like the steps: for m
sub-instructions, the m extra CLIP text passes (one batch of m prompts through the text encoder, SD 1.5's 12-layer
CLIP ViT-L/14 text tower at real size), SACA (Eq. 3-6), and BCCA: the open_clip vision tower on the source and the
empty image of the guidance branches (``MCIEModel.guidance_background``, as :mod:`model.pipeline` runs it) plus the
resampler (Eq. 9) on the three branches. ``in_steps`` is that
cost in baseline steps; ``edit_ratio_20_steps`` = (encoding + 20 MCIE steps) / (20 baseline steps), the whole
edit's ratio at the paper's 20 steps (InstructPix2Pix's own text encoding, common to both, is left out).

Cases (encodings included) are interleaved repeat by repeat; ``ms`` is the fastest repeat (the least disturbed by
other load), the median is reported too; ``ratio`` = MCIE / baseline. On CPU the clock is the process's CPU time with
one thread (``--threads``), which other processes on a shared machine disturb far less than wall-clock time; on CUDA
it is synchronised wall-clock time.

- ``cpu_small``: random weights, an SD-1.5-shaped UNet scaled down (3 levels, widths 64/128/256, cross-attention
  width 128) at a 256 x 256 image (32 x 32 latent), fp32, the real SACA/BCCA sizes (2 and 16 queries, 2 and 4
  blocks) at width 128, a tiny open_clip tower.
- ``cuda_sd15`` (when CUDA is available): the real SD 1.5 UNet shape (in_channels 8), random weights, fp16, 512 x 512,
  SACA/BCCA at the paper's sizes with OpenCLIP ViT-H/14 (random), plus a training step at batch 4 (fp32 weights,
  fp16 autocast, AdamW on the trained parameters, no gradient checkpointing): its time and peak GPU memory.

Goal: ``ratio <= 1.3`` at real size. Usage: ``python bench/model_speed.py [--repeat 5] [--skip-cuda]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mcie.model.bcca import OpenClipPatchEncoder, build_vision_tower
from mcie.model.config import MCIEConfig
from mcie.model.network import MCIEModel, SubInstructionBatch

GOAL = 1.3
SUB_COUNTS = (1, 2, 3, 4)
BOXES = [(0.05, 0.1, 0.45, 0.6), (0.5, 0.05, 0.95, 0.5), (0.1, 0.55, 0.6, 0.95), (0.55, 0.5, 0.9, 0.9)]
TINY_VISION = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SMALL_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": (64, 128, 256),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 128,
    "attention_head_dim": 8,
}


def _build(
    unet_config: dict[str, Any], config: MCIEConfig, vision: OpenClipPatchEncoder, device: torch.device,
    text_size: tuple[int, int, int] = (1, 8, 0),
) -> tuple[Any, MCIEModel]:
    """A plain UNet and an MCIE-E1 model sharing its initial weights (random), created on ``device``; the text
    encoder has ``text_size = (layers, heads, intermediate)`` (0: the width)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    dim = unet_config["cross_attention_dim"]
    with torch.device(device):
        base = UNet2DConditionModel(**unet_config).eval()
        unet = UNet2DConditionModel(**unet_config)
        unet.load_state_dict(base.state_dict())
        layers, heads, inner = text_size
        text_config = CLIPTextConfig(
            hidden_size=dim, intermediate_size=inner or dim, num_hidden_layers=layers, vocab_size=49408,
            num_attention_heads=heads, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
        text = CLIPTextModel(text_config)
        vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4)
        model = MCIEModel(unet, vae, text, None, {"num_train_timesteps": 1000}, config, vision).eval()
    with torch.no_grad():  # LoRA B starts at 0; give it values so the merged / unmerged paths do real work
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 1e-3)
    return base, model


def _sub_batch(
    model: MCIEModel, batch: int, count: int, device: torch.device, dtype: torch.dtype, guided: bool = True
) -> SubInstructionBatch:
    """SACA contexts for ``count`` sub-instructions (random text tokens), as the guided 3-branch batch."""
    assert model.saca is not None
    dim = int(model.unet.config.cross_attention_dim)
    text = torch.randn(batch, count, 77, dim, device=device, dtype=dtype)
    boxes = torch.tensor(BOXES[:count], device=device).repeat(batch, 1, 1)
    sub = SubInstructionBatch(model.saca(text, boxes), torch.ones(batch, count, dtype=torch.bool, device=device), boxes)
    return SubInstructionBatch.cat([sub, sub.dropped(), sub.dropped()]) if guided else sub


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds of ``fn``: wall clock on CUDA (synchronised), process CPU time on CPU (robust to other load)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def measure(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (clock() - start) * 1000

    return measure


def _merge_lora(model: MCIEModel) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()


def _encode_edit(model: MCIEModel, m: int, pixels: torch.Tensor) -> dict[str, Any]:
    """The per-edit encoding of one image with ``m`` sub-instructions, in its three parts (callables)."""
    device, dtype = pixels.device, pixels.dtype
    ids = torch.randint(2, 49408, (m, 77), device=device, generator=torch.Generator(device).manual_seed(m))
    boxes = torch.tensor(BOXES[:m], device=device).view(1, m, 4)
    assert model.saca is not None
    tokens = model.text_encoder(ids)[0].view(1, m, 77, -1).to(dtype)
    return {
        "clip_text": lambda: model.text_encoder(ids)[0],
        "saca": lambda: model.saca(tokens, boxes),
        "bcca": lambda: model.guidance_background(pixels),
    }


@torch.no_grad()
def step_times(
    unet_config: dict[str, Any], config: MCIEConfig, vision: OpenClipPatchEncoder, device: torch.device,
    dtype: torch.dtype, image_size: int, repeat: int, batch: int = 1, text_size: tuple[int, int, int] = (1, 8, 0),
) -> dict[str, Any]:
    base, model = _build(unet_config, config, vision, device, text_size)
    base.to(device, dtype)
    model.to(device, dtype)
    latent = image_size // 8
    cfg = 3 * batch
    latents = torch.randn(cfg, 4, latent, latent, device=device, dtype=dtype)
    source = torch.randn(cfg, 4, latent, latent, device=device, dtype=dtype)
    text = torch.randn(cfg, 77, int(unet_config["cross_attention_dim"]), device=device, dtype=dtype)
    t = torch.tensor(500.0, device=device)
    measure = _timer(device)
    pixels = torch.rand(batch, 3, image_size, image_size, device=device, dtype=dtype) * 2 - 1
    encoders = {m: _encode_edit(model, m, pixels[:1]) for m in SUB_COUNTS}
    background = model.guidance_background(pixels)
    subs = {m: _sub_batch(model, batch, m, device, dtype) for m in SUB_COUNTS}
    cases: dict[str, Callable[[], Any]] = {
        "baseline": lambda: base(torch.cat([latents, source], 1), t, encoder_hidden_states=text, return_dict=False),
    }
    for m in SUB_COUNTS:
        cases[f"mcie_{m}"] = lambda m=m: model(latents, t, source, text, subs[m], background=background)
    for m, parts in encoders.items():
        for part, fn in parts.items():
            cases[f"encode_{m}_{part}"] = fn
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(repeat):
        for name, fn in cases.items():
            samples[name].append(measure(fn))
    _merge_lora(model)
    model(latents, t, source, text, subs[4], background=background)
    merged = [measure(lambda: model(latents, t, source, text, subs[4], background=background)) for _ in range(repeat)]
    baseline, baseline_median = min(samples["baseline"]), statistics.median(samples["baseline"])
    encode = []
    for m in SUB_COUNTS:
        parts = {part: min(samples[f"encode_{m}_{part}"]) for part in ("clip_text", "saca", "bcca")}
        total = sum(parts.values())
        encode.append({"sub_instructions": m, **{f"{k}_ms": round(v, 2) for k, v in parts.items()},
                       "total_ms": round(total, 2), "in_steps": round(total / baseline, 3),
                       "edit_ratio_20_steps": round((total + 20 * min(samples[f"mcie_{m}"])) / (20 * baseline), 3)})
    return {
        "image_size": image_size,
        "dtype": str(dtype).removeprefix("torch."),
        "cfg_batch": cfg,
        "repeat": repeat,
        "baseline_ms": round(baseline, 2),
        "baseline_median_ms": round(baseline_median, 2),
        "mcie": [
            {
                "sub_instructions": m,
                "ms": round(min(samples[f"mcie_{m}"]), 2),
                "median_ms": round(statistics.median(samples[f"mcie_{m}"]), 2),
                "ratio": round(min(samples[f"mcie_{m}"]) / baseline, 3),
                "median_ratio": round(statistics.median(samples[f"mcie_{m}"]) / baseline_median, 3),
            }
            for m in SUB_COUNTS
        ],
        "mcie_lora_merged": {"sub_instructions": 4, "ratio": round(min(merged) / baseline, 3)},
        "encode_per_edit": encode,
    }


def training_step(
    unet_config: dict[str, Any], config: MCIEConfig, vision: OpenClipPatchEncoder, device: torch.device,
    image_size: int, batch: int = 4,
) -> dict[str, Any]:
    """One optimisation step at ``batch`` (fp32 weights, fp16 autocast on CUDA): time and peak memory."""
    _, model = _build(unet_config, config, vision, device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    latent, dim = image_size // 8, int(unet_config["cross_attention_dim"])
    pixels = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            noisy = torch.randn(batch, 4, latent, latent, device=device)
            sub = _sub_batch(model, batch, 4, device, torch.float32, guided=False)
            background = model.encode_background(pixels)
            text = torch.randn(batch, 77, dim, device=device)
            timesteps = torch.randint(0, 1000, (batch,), device=device)
            eps = model(noisy, timesteps, torch.randn_like(noisy), text, sub, background=background)
            loss = torch.nn.functional.mse_loss(eps.float(), torch.randn_like(eps.float()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measure = _timer(device)
    step()  # warm-up (allocates the optimizer state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = measure(step)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "batch": batch,
        "image_size": image_size,
        "ms": round(ms, 1),
        "peak_gib": None if peak is None else round(peak, 2),
        "trained_parameters_m": round(sum(p.numel() for p in model.trainable_parameters()) / 1e6, 2),
    }


def _vision(name: str, config: dict[str, Any] | None, device: torch.device) -> OpenClipPatchEncoder:
    torch.manual_seed(0)
    with torch.device(device):
        visual, arch = build_vision_tower(name, config)
    return OpenClipPatchEncoder(visual, arch, layer=-2)


def cpu_small(repeat: int) -> dict[str, Any]:
    config = MCIEConfig(saca_width=128, saca_heads=8, bcca_width=128, bcca_heads=8, clip_vision_model="tiny",
                        clip_vision_model_config=TINY_VISION)
    vision = _vision("tiny", TINY_VISION, torch.device("cpu"))
    result = step_times(SMALL_UNET, config, vision, torch.device("cpu"), torch.float32, 256, repeat,
                        text_size=(12, 8, 512))  # SD 1.5's 12-layer text tower, scaled to width 128 like the UNet
    result["unet"] = "SD-1.5-shaped, widths 64/128/256, cross-attention 128; text encoder 12 layers at 128"
    result["threads"] = torch.get_num_threads()
    return result


def cuda_sd15(repeat: int) -> dict[str, Any]:
    device = torch.device("cuda")
    config = MCIEConfig(clip_vision_model="ViT-H-14")
    vision = _vision("ViT-H-14", None, device)
    result = step_times(SD15_UNET, config, vision, device, torch.float16, 512, repeat, text_size=(12, 12, 3072))
    result["unet"] = "SD 1.5 (in_channels 8), random weights"
    result["gpu"] = torch.cuda.get_device_name(device)
    torch.cuda.empty_cache()
    result["train_step"] = training_step(SD15_UNET, config, vision.float(), device, 512, batch=4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is least disturbed by other load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {
        "benchmark": "model_speed",
        "goal_ratio": GOAL,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_small": cpu_small(args.repeat),
        "cuda_sd15": None,
    }
    if torch.cuda.is_available() and not args.skip_cuda:
        out["cuda_sd15"] = cuda_sd15(args.repeat)
        out["meets_goal"] = all(row["ratio"] <= GOAL for row in out["cuda_sd15"]["mcie"])
    else:
        out["cuda_sd15_skipped"] = "CUDA not available" if not torch.cuda.is_available() else "--skip-cuda"
        out["meets_goal"] = None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
