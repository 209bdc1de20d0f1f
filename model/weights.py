"""Saving and loading MCIE-E1's trained parts: LoRA, SACA, BCCA and the processors' projections.

A weights folder holds ``mcie_e1.safetensors`` (the tensors, named as in :meth:`MCIEModel.named_parameters`, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight``,
``unet.….attn2.processor.to_k_sub.weight``, ``saca.…``, ``bcca.…``) and ``mcie_config.json`` (the
:class:`~model.config.MCIEConfig`). The frozen base (InstructPix2Pix, the open_clip tower) is not saved: load the
weights onto the same base folder with ``MCIEModel.from_pretrained(base_folder, weights=folder,
vision_checkpoint=...)``. Loading is strict: a missing file, a missing or unexpected key, or a shape mismatch is an
error naming the file and the key. Tensors are saved in their training dtype and cast to the model's on load. A
weights folder may also be given as a Hugging Face Hub id (``owner/name[@revision]``, see :mod:`mcie.hub`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mcie.model.config import MCIEConfig

if TYPE_CHECKING:
    from mcie.model.network import MCIEModel

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "WeightsError", "load_weights", "read_config", "save_weights"]

WEIGHTS_NAME = "mcie_e1.safetensors"
CONFIG_NAME = "mcie_config.json"


class WeightsError(ValueError):
    """A weights file does not fit the model; the message names the file and the key."""


def save_weights(model: MCIEModel, folder: str | Path) -> Path:
    """Write the trained tensors and the config into ``folder`` (created if needed); returns the folder."""
    from safetensors.torch import save_file

    if model.config is None:
        raise ValueError("save_weights: a plain InstructPix2Pix model has no MCIE weights to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.trained_state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": model.config.format})
    model.config.save(folder / CONFIG_NAME)
    return folder


def weights_folder(folder: str | Path) -> Path:
    """The local weights folder of a path or a Hub id ``owner/name[@revision]`` (:mod:`mcie.hub`)."""
    from mcie.hub import resolve_folder

    return resolve_folder(folder, "MCIE_EDITING_WEIGHTS_PATH", allow=(WEIGHTS_NAME, CONFIG_NAME))


def read_config(folder: str | Path) -> MCIEConfig:
    """The config saved in a weights folder (a local folder or a Hub id)."""
    return MCIEConfig.load(weights_folder(folder) / CONFIG_NAME)


def _check(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightsError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise WeightsError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{path}: key {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )


def load_weights(model: MCIEModel, folder: str | Path) -> None:
    """Copy the tensors of ``folder/mcie_e1.safetensors`` into ``model`` (strict, see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if model.config is None:
        raise ValueError("load_weights: build the model with the weights' config first (MCIEModel.from_pretrained)")
    path = weights_folder(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"MCIE weights file not found: {path}")
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    parameters = dict(model.named_parameters())
    expected = {name: parameters[name] for name in model.trained_parameter_names()}
    _check(path, state, expected)
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor.to(device=expected[key].device, dtype=expected[key].dtype))
