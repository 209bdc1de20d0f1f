"""Which torch device a setting means: the one ``resolve_device`` for the MLLM backend, previews and the model."""

from __future__ import annotations


def resolve_device(device: str | None) -> str:
    """``auto`` (or None / empty) -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given.

    torch is imported here, not at module level, so the web process and the CLI start without it.
    """
    if device not in (None, "", "auto"):
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
