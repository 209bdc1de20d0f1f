"""A tiny open_clip model with random weights, for tests that must never download a real CLIP.

``build_tiny_clip()`` registers the architecture ``mcie-tiny-clip`` (a 2-layer ViT on 32 x 32 images with a
2-layer text tower, 32-d embeddings; vocabulary and context length are CLIP's, so open_clip's bundled
tokenizer works with it) and returns a seeded model with its inference preprocess. ``save_tiny_clip`` writes
such a model as a checkpoint file that ``open_clip.create_model_and_transforms(TINY_CLIP_NAME,
pretrained=str(path))`` loads back.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

TINY_CLIP_NAME = "mcie-tiny-clip"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip(name: str = TINY_CLIP_NAME, config: dict[str, Any] | None = None) -> str:
    """Make ``name`` a known open_clip architecture (idempotent) and return it."""
    from open_clip import factory

    # open_clip's public add_model_config() only reads JSON files; its registry is this dict.
    factory._MODEL_CONFIGS[name] = copy.deepcopy(config or TINY_CLIP_CONFIG)
    return name


def build_tiny_clip(seed: int = 0, name: str = TINY_CLIP_NAME) -> tuple[Any, Any]:
    """A seeded tiny open_clip model in eval mode, and its inference (validation) preprocess."""
    import open_clip
    import torch

    register_tiny_clip(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval(), preprocess


def save_tiny_clip(path: Path, seed: int = 0, name: str = TINY_CLIP_NAME) -> Path:
    """Save a seeded tiny model's state dict to ``path`` (``.safetensors`` or a torch file) and return it."""
    import torch

    model, _ = build_tiny_clip(seed, name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
