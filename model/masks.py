"""Boxes to attention masks at every UNet resolution, their union, and the timestep schedule (paper Eq. 7, 8, 10).

Boxes are normalised ``(x0, y0, x1, y1)`` in [0, 1] with (x0, y0) the top-left edge (the convention of
:class:`mcie.geometry.Box`); a sub-instruction without a box (a global edit such as "make it sunny") gets the whole
image. A mask at a resolution h x w is a float tensor in [0, 1] over latent cells, flattened row-major as the
diffusers transformer blocks flatten ``(h, w)`` into tokens.

Resizing (``mask_resize`` of :class:`model.config.MCIEConfig`):

- ``"area"``: the exact fraction of each cell the box covers (separable: x-overlap times y-overlap), which equals
  area-downsampling the pixel mask but needs no pixel mask and works at any size, odd ones included.
- ``"nearest"``: a cell is in the box when its centre is; a box thinner than a cell keeps the cell that holds its
  centre, so no box disappears at the coarsest resolution.

Pixel masks (``box_mask``, e.g. from a data loader) are resized with adaptive average pooling (``"area"``) or by
thresholding that at 0.5 (``"nearest"``, again keeping the strongest cell of a non-empty mask).

Mask strength and how a mask enters attention. Eq. 8 gives ``M'_i = M_i * exp(-t / T)``, with ``s = exp(-t / T)``
running from ``exp(-1) ~ 0.37`` at the noisiest step to 1 at ``t = 0`` (``t`` normalised by ``T =
num_train_timesteps``, so training and any number of inference steps agree). The mask becomes a multiplicative
weight on each attention probability (:mod:`model.attention`). Two readings of Eq. 8 are offered
(``schedule_form`` of :class:`model.config.MCIEConfig`), side by side for a latent p and sub-instruction i:

===================  ==============================  =================================  ========================
``schedule_form``    weight of ``C_i``'s tokens       weight of the base text tokens     meaning
===================  ==============================  =================================  ========================
``"strength"``       ``1 - s * (1 - M_i(p))``        ``1 - s * U(p)``                   ``s`` is the strength of
(default)            (1 inside, ``1 - s`` outside)                                      the masking: early, the
                                                                                        outside sees ``C_i`` too
``"literal"``        ``s * M_i(p)``                  ``1 - s * U(p)`` (``= 1 - U'``)    ``M'`` as written: ``C_i``
                     (``s`` inside, 0 outside)                                          never reaches outside its
                                                                                        box, fades inside early
===================  ==============================  =================================  ========================

``U`` is the union of the boxes (the max of the masks). At ``t = 0`` both readings are the same: a latent inside box
i sees exactly the sub-instruction(s) whose box holds it, one outside every box sees only the base text. No row is
ever fully masked: where ``U(p) = 1`` some ``M_i(p) = 1`` and ``s > 0``. Padding slots (``valid = False``) get weight 0
everywhere.

The background branch's mask (Eq. 10, ``1 - M_union``) depends only on the query position, and a weight that is the
same for every key of a softmax would cancel when the probabilities are renormalised (with an additive bias; Eq. 10
as written multiplies the logits, which does not cancel but does not block either), so it gates the branch's output
instead (the way IP-Adapter applies its masks). By default that gate is Eq. 10's plain ``1 - U(p)``, so background
tokens never reach inside the boxes; ``background_schedule = "faded"`` also applies Eq. 8 to it, ``1 - s * U(p)``,
which lets the background branch in at weight ``1 - s`` (0.63 at the noisiest step) inside the boxes (an ablation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "FULL_BOX",
    "background_gate",
    "box_coverage",
    "box_raster",
    "box_tuple",
    "boxes_tensor",
    "foreground_weights",
    "latent_grid",
    "mask_strength",
    "masks_at",
    "resize_pixel_masks",
    "union_mask",
]

FULL_BOX = (0.0, 0.0, 1.0, 1.0)


# --- boxes ----------------------------------------------------------------------------------------------------


def box_tuple(box: Any, where: str = "box") -> tuple[float, float, float, float]:
    """A box as four floats: ``None`` (whole image), a 4-sequence, or an object with ``x0, y0, x1, y1``."""
    if box is None:
        return FULL_BOX
    if all(hasattr(box, name) for name in ("x0", "y0", "x1", "y1")):
        values = (box.x0, box.y0, box.x1, box.y1)
    elif isinstance(box, torch.Tensor):
        values = tuple(box.detach().flatten().tolist())
    else:
        values = tuple(box)
    if len(values) != 4:
        raise ValueError(f"{where}: expected 4 numbers (x0, y0, x1, y1), got {len(values)}")
    x0, y0, x1, y1 = (float(v) for v in values)
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in (x0, y0, x1, y1)):
        raise ValueError(f"{where}: coordinates must be normalised to [0, 1], got {values}")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{where}: expected x0 < x1 and y0 < y1, got {values}")
    return (x0, y0, x1, y1)


def boxes_tensor(boxes: Sequence[Sequence[Any]], slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample box lists to a padded ``(B, slots, 4)`` tensor and a ``(B, slots)`` validity mask."""
    out = torch.tensor(FULL_BOX).repeat(len(boxes), slots, 1)
    valid = torch.zeros(len(boxes), slots, dtype=torch.bool)
    for b, sample in enumerate(boxes):
        if len(sample) > slots:
            raise ValueError(f"sample {b}: {len(sample)} boxes but only {slots} slots")
        for i, box in enumerate(sample):
            out[b, i] = torch.tensor(box_tuple(box, where=f"sample {b}, box {i}"))
            valid[b, i] = True
    return out, valid


# --- masks at one resolution ----------------------------------------------------------------------------------


def _overlap(lo: torch.Tensor, hi: torch.Tensor, cells: int) -> torch.Tensor:
    """Fraction of each of ``cells`` unit cells on [0, 1] covered by [lo, hi]: ``(...,)`` -> ``(..., cells)``."""
    edges = torch.arange(cells + 1, device=lo.device, dtype=torch.float32) / cells
    left, right = edges[:-1], edges[1:]
    cover = torch.minimum(hi.float()[..., None], right) - torch.maximum(lo.float()[..., None], left)
    return (cover.clamp(min=0) * cells).clamp(max=1)


def box_coverage(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Exact area fraction of each of ``height x width`` cells covered by each box: ``(..., 4) -> (..., h, w)``."""
    cover_x = _overlap(boxes[..., 0], boxes[..., 2], width)
    cover_y = _overlap(boxes[..., 1], boxes[..., 3], height)
    return cover_y[..., :, None] * cover_x[..., None, :]


def _inside(lo: torch.Tensor, hi: torch.Tensor, cells: int) -> torch.Tensor:
    centres = (torch.arange(cells, device=lo.device, dtype=torch.float32) + 0.5) / cells
    inside = (centres >= lo.float()[..., None]) & (centres < hi.float()[..., None])
    centre_cell = ((lo.float() + hi.float()) / 2 * cells).long().clamp(0, cells - 1)
    keep = F.one_hot(centre_cell, cells).bool()
    return torch.where(inside.any(dim=-1, keepdim=True), inside, keep).float()


def box_raster(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Binary rasterisation: a cell is in when its centre is (never empty, see the module docstring)."""
    in_x = _inside(boxes[..., 0], boxes[..., 2], width)
    in_y = _inside(boxes[..., 1], boxes[..., 3], height)
    return in_y[..., :, None] * in_x[..., None, :]


def resize_pixel_masks(masks: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """``(B, m, H, W)`` masks in [0, 1] to ``(B, m, h, w)``, by area or nearest (see the module docstring)."""
    area = F.adaptive_avg_pool2d(masks.float(), (height, width))
    if mode == "area":
        return area
    if mode != "nearest":
        raise ValueError(f"mask_resize: expected 'area' or 'nearest', got {mode!r}")
    binary = (area >= 0.5).float()
    flat, flat_area = binary.flatten(-2), area.flatten(-2)
    strongest = F.one_hot(flat_area.argmax(dim=-1), flat.shape[-1]).float()
    empty = (flat.sum(dim=-1, keepdim=True) == 0) & (flat_area.amax(dim=-1, keepdim=True) > 0)
    return torch.where(empty, strongest, flat).view_as(area)


def masks_at(
    boxes: torch.Tensor, height: int, width: int, mode: str, pixel_masks: torch.Tensor | None = None
) -> torch.Tensor:
    """The masks of ``(B, m, 4)`` boxes (or of ``(B, m, H, W)`` pixel masks when given) at ``height x width``."""
    if pixel_masks is not None:
        if pixel_masks.shape[:2] != boxes.shape[:2]:
            raise ValueError(
                f"box_mask: expected shape (B, m, H, W) with (B, m) = {tuple(boxes.shape[:2])}, "
                f"got {tuple(pixel_masks.shape)}"
            )
        return resize_pixel_masks(pixel_masks, height, width, mode)
    if mode == "area":
        return box_coverage(boxes, height, width)
    if mode == "nearest":
        return box_raster(boxes, height, width)
    raise ValueError(f"mask_resize: expected 'area' or 'nearest', got {mode!r}")


def union_mask(masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Union (max) over the valid slots: ``(B, m, ...) -> (B, ...)``; 0 where a sample has no valid slot."""
    shape = valid.shape + (1,) * (masks.ndim - valid.ndim)
    return (masks * valid.view(shape).to(masks.dtype)).amax(dim=1) if masks.shape[1] else masks.sum(dim=1)


# --- schedule and attention weights ---------------------------------------------------------------------------


def mask_strength(timesteps: torch.Tensor, num_train_timesteps: int, enabled: bool = True) -> torch.Tensor:
    """Eq. 8's factor ``exp(-t / T)`` per sample (float32), or ones when the schedule is off."""
    t = timesteps.float().reshape(-1)
    if not enabled:
        return torch.ones_like(t)
    return torch.exp(-t / float(num_train_timesteps))


def foreground_weights(
    masks: torch.Tensor, valid: torch.Tensor, strength: torch.Tensor, form: str = "strength"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights of the foreground branch: base tokens ``(B, N)``, sub-instruction tokens ``(B, m, N)``.

    ``masks: (B, m, N)``, ``valid: (B, m)``, ``strength: (B,)``, ``form`` the reading of Eq. 8 (``"strength"`` or
    ``"literal"``); see the module docstring for the formulas.
    """
    s = strength.float().view(-1, 1, 1)
    if form == "literal":
        slot = s * masks.float() * valid[..., None].float()
    elif form == "strength":
        slot = (1 - s * (1 - masks.float())) * valid[..., None].float()
    else:
        raise ValueError(f"schedule_form: expected 'strength' or 'literal', got {form!r}")
    base = 1 - strength.float().view(-1, 1) * union_mask(masks.float(), valid)
    return base.clamp(0, 1), slot.clamp(0, 1)


def background_gate(
    masks: torch.Tensor, valid: torch.Tensor, strength: torch.Tensor, faded: bool = False
) -> torch.Tensor:
    """Eq. 10's ``1 - M_union`` per position, ``(B, N)``, applied to the background branch's output; ``faded`` also
    applies Eq. 8's strength: ``1 - s * M_union`` (see the module docstring)."""
    union = union_mask(masks.float(), valid)
    if faded:
        union = strength.float().view(-1, 1) * union
    return (1 - union).clamp(0, 1)


def latent_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` of a UNet level with ``tokens`` positions, for an input latent of ``latent_hw``.

    diffusers' downsamplers (stride-2 convolutions with padding 1) map a side ``n`` to ``ceil(n / 2)``.
    """
    height, width = latent_hw
    for _ in range(16):
        if height * width == tokens:
            return height, width
        if height * width < tokens:
            break
        height, width = -(-height // 2), -(-width // 2)
    raise ValueError(f"cannot place {tokens} attention positions on a UNet level of a {latent_hw} latent")
