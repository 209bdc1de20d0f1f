"""Tiny random MCIE-E1 building blocks for tests: nothing is downloaded, everything is seeded.

- ``build_tiny_tokenizer()``: a transformers ``CLIPTokenizer`` made offline from the BPE merges open_clip ships
  (``bpe_simple_vocab_16e6.txt.gz``), cut to the first ``TINY_MERGES`` merges so the vocabulary stays small. It
  tokenises like CLIP's (same byte-level alphabet, same special tokens, context length 77).
- ``build_tiny_components(seed)``: an 8-input-channel ``UNet2DConditionModel`` with cross-attention at two levels and
  the mid block, a 2-level ``AutoencoderKL`` (latent = image / 2), a 2-layer ``CLIPTextModel`` (width 32), the
  tokenizer and an ``EulerAncestralDiscreteScheduler``.
- ``save_tiny_base(folder, seed)``: those components saved through ``StableDiffusionInstructPix2PixPipeline.
  save_pretrained`` (the diffusers layout ``MCIEModel.from_pretrained`` reads, with ``model_index.json``).
- ``save_tiny_vision(path, seed)``: the open_clip tiny CLIP of :mod:`tests.tiny_clip` as a checkpoint file.
- ``tiny_config(**overrides)``: an :class:`MCIEConfig` at tiny widths that names that tiny open_clip architecture.
- ``TinyFiles`` / ``make_tiny_files(root)`` and ``load_tiny_model(files, ...)``: the three together, loaded back
  through the real loading code.

Images are ``TINY_IMAGE`` pixels square (latents ``TINY_IMAGE // 2``; UNet levels 16, 8 and the mid block at 8).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcie.model.config import MCIEConfig
from tests.tiny_clip import TINY_CLIP_CONFIG, TINY_CLIP_NAME, save_tiny_clip

TINY_MERGES = 2000
TINY_IMAGE = 32
TEXT_WIDTH = 32


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (as in open_clip.tokenizer)."""
    from open_clip.tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def build_tiny_tokenizer(merges: int = TINY_MERGES) -> Any:
    """A CLIP BPE tokenizer over the first ``merges`` merges of open_clip's bundled vocabulary."""
    import open_clip
    from transformers import CLIPTokenizer

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path) as handle:
        lines = handle.read().decode("utf-8").split("\n")[1 : merges + 1]
    pairs = [tuple(line.split()) for line in lines]
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(p) for p in pairs]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs)
    tokenizer.model_max_length = 77
    return tokenizer


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer, scheduler: tiny, random, seeded."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_IMAGE // 2,
            in_channels=8,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=TINY_IMAGE,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_WIDTH,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_tiny_base(folder: Path, seed: int = 0) -> Path:
    """Save the tiny components as a diffusers InstructPix2Pix folder."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        **build_tiny_components(seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def save_tiny_vision(path: Path, seed: int = 0) -> Path:
    return save_tiny_clip(Path(path), seed)


def tiny_config(**overrides: Any) -> MCIEConfig:
    values: dict[str, Any] = {
        "saca_width": 16,
        "saca_heads": 2,
        "bcca_width": 16,
        "bcca_heads": 2,
        "bcca_queries": 4,
        "fourier_freqs": 4,
        "ff_mult": 2,
        "lora_rank": 2,
        "lora_alpha": 2.0,
        "clip_vision_model": TINY_CLIP_NAME,
        "clip_vision_model_config": json.loads(json.dumps(TINY_CLIP_CONFIG)),
    }
    values.update(overrides)
    return MCIEConfig(**values)


@dataclass(frozen=True)
class TinyFiles:
    base: Path
    vision: Path


def make_tiny_files(root: Path, seed: int = 0) -> TinyFiles:
    root.mkdir(parents=True, exist_ok=True)
    return TinyFiles(save_tiny_base(root / "ip2p", seed), save_tiny_vision(root / "tiny_clip.safetensors", seed))


def load_tiny_model(
    files: TinyFiles, config: MCIEConfig | None = None, weights: Path | None = None, seed: int = 0
) -> Any:
    """``MCIEModel.from_pretrained`` on the tiny files; the new modules are initialised under ``seed``."""
    from mcie.model.network import MCIEModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MCIEModel.from_pretrained(files.base, config=config, weights=weights, vision_checkpoint=files.vision)
    return model.eval()


def randomize_trained(model: Any, seed: int = 1, std: float = 0.2) -> None:
    """Give the trained parameters (LoRA B is zero at init) random values, so tests see every path act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def tiny_images(batch: int, seed: int = 0) -> list[Any]:
    """``batch`` random RGB PIL images of TINY_IMAGE pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (TINY_IMAGE, TINY_IMAGE, 3), dtype=np.uint8)) for _ in range(batch)]
