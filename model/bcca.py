"""BCCA's token side (paper Eq. 9): open_clip vision patch tokens of the source image -> MLP -> learnable queries.

``OpenClipPatchEncoder`` wraps an open_clip ``VisionTransformer`` (frozen). It takes the patch-token sequence, not
only the pooled embedding: ``VisionTransformer.forward_intermediates(..., indices=[layer], output_fmt="NLC",
intermediates_only=True)`` returns the tokens after block ``layer`` with the class token split off (open_clip 3.x);
``clip_vision_layer = -2`` (penultimate block, before ``ln_post``) is IP-Adapter-Plus' choice. Source pixels come in
the VAE's convention (``(B, 3, H, W)`` in [-1, 1]) and are resized, whole and without cropping (every background
pixel matters; the aspect ratio is not kept), with bicubic antialiasing to the tower's square input size, then
normalised with the architecture's mean and std (OpenAI's unless its config says otherwise).

Only the vision tower is built (``open_clip.model._build_vision_tower`` from the architecture's config, so the
text tower of a large CLIP is never allocated; open_clip itself builds towers this way). Its weights come from a
checkpoint file (a path, or a Hub id / pretrained tag resolved by :func:`mcie.hub.resolve_open_clip`): a full
open_clip CLIP state dict (its ``visual.*`` keys are used), or a vision-only one; ``.safetensors`` or a torch
file, optionally under ``"state_dict"`` and with DDP's ``module.`` prefix. Anything missing or left over is an
error naming the file and the key.

``BackgroundContext`` is ``f = Q_beta(MLP(CLIP(I_src)))``: LayerNorm + Linear + GELU + Linear from the tower width to
``bcca_width``, then the shared :class:`model.saca.QueryTransformer` with 16 queries and 4 blocks, projected to the
UNet's cross-attention width. The unconditional ("no image") tokens used by classifier-free guidance and condition
dropout are those of an all-zero (post-normalisation) input image, as diffusers' IP-Adapter-Plus does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcie.model.saca import QueryTransformer

__all__ = ["BackgroundContext", "OpenClipPatchEncoder", "build_vision_tower", "load_state_file"]

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (weights only); unwraps ``state_dict`` and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip vision checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _architecture(name: str, model_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_config is not None:
        return copy.deepcopy(dict(model_config))
    from open_clip import get_model_config

    config = get_model_config(name)
    if config is None:
        raise ValueError(f"clip_vision_model: {name!r} is not an open_clip architecture (see open_clip.list_models())")
    return config


def build_vision_tower(name: str, model_config: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """An open_clip vision tower with random weights, and its architecture config."""
    from open_clip.model import _build_vision_tower

    config = _architecture(name, model_config)
    if "vision_cfg" not in config or "embed_dim" not in config:
        raise ValueError(f"clip_vision_model_config for {name!r}: expected 'embed_dim' and 'vision_cfg' keys")
    visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=config.get("quick_gelu", False))
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "conv1"):
        raise ValueError(f"{name!r}: BCCA needs an open_clip VisionTransformer tower, got {type(visual).__name__}")
    return visual, config


class OpenClipPatchEncoder(nn.Module):
    """Frozen open_clip vision tower returning patch tokens ``(B, P, width)`` for VAE-convention pixels."""

    def __init__(self, visual: nn.Module, config: Mapping[str, Any], layer: int = -2) -> None:
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        self.layer = layer
        size = visual.image_size
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        preprocess = dict(config.get("preprocess_cfg", {}))
        self.register_buffer("mean", torch.tensor(preprocess.get("mean", _OPENAI_MEAN)).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(preprocess.get("std", _OPENAI_STD)).view(1, 3, 1, 1), False)

    @property
    def width(self) -> int:
        return int(self.visual.conv1.out_channels)

    @classmethod
    def from_checkpoint(
        cls, name: str, checkpoint: str | Path | None, model_config: Mapping[str, Any] | None = None, layer: int = -2
    ) -> OpenClipPatchEncoder:
        visual, config = build_vision_tower(name, model_config)
        if checkpoint is not None:
            from mcie.hub import resolve_open_clip

            _load_vision_weights(visual, resolve_open_clip(name, checkpoint, "MCIE_EDITING_VISION_CHECKPOINT"))
        return cls(visual, config, layer)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> the tower's normalised square input."""
        images = (pixels.float() + 1) / 2
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (images.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens; samples where ``drop`` is true see an all-zero normalised image (the "no image" input)."""
        images = self.preprocess(pixels)
        if drop is not None:
            images = images * (~drop.to(images.device).bool()).view(-1, 1, 1, 1).to(images.dtype)
        dtype = self.visual.conv1.weight.dtype
        out = self.visual.forward_intermediates(
            images.to(dtype), indices=[self.layer], stop_early=True, output_fmt="NLC", intermediates_only=True
        )
        return out["image_intermediates"][0]


def _load_vision_weights(visual: nn.Module, path: Path) -> None:
    state = load_state_file(path)
    if any(key.startswith("visual.") for key in state):
        state = {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
    expected = visual.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise KeyError(f"{path}: missing vision-tower key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise KeyError(f"{path}: unexpected vision-tower key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path}: key {key!r} has shape {tuple(value.shape)}, the architecture expects "
                f"{tuple(expected[key].shape)}"
            )
    visual.load_state_dict(state, strict=True)


class BackgroundContext(nn.Module):
    """BCCA's learned part (Eq. 9): patch tokens ``(B, P, vision_width)`` -> ``(B, num_queries, D)``."""

    def __init__(
        self, vision_width: int, cross_attention_dim: int, num_queries: int, num_layers: int, width: int, heads: int,
        ff_mult: int,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(vision_width), nn.Linear(vision_width, width), nn.GELU(), nn.Linear(width, width)
        )
        self.transformer = QueryTransformer(num_queries, num_layers, width, heads, ff_mult, cross_attention_dim)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.mlp(patch_tokens.to(self.mlp[1].weight.dtype)))
