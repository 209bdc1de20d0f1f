"""Configuration of the MCIE-E1 model (paper 3.2 and 4.2), saved as JSON next to the trained weights.

The paper fixes: Stable Diffusion 1.5 initialised from InstructPix2Pix, SACA with L1 = 2 transformer blocks and 2
learnable queries, BCCA with L2 = 4 blocks and 16 learnable queries, LoRA on the self-attention layers only, Euler
Ancestral sampling with 20 steps. Everything below that the paper leaves open is a field here, with its default and
the reason for it:

- ``fourier_freqs``: number of frequency bands of Eq. 5, ``f_k = 2**k`` for ``k = 0 .. fourier_freqs - 1`` (the
  NeRF / GLIGEN positional-encoding family; 8 bands resolve a box edge to about 1/256 of the image).
- ``saca_width`` / ``saca_heads`` / ``bcca_width`` / ``bcca_heads`` / ``ff_mult``: the width of the learnable-query
  transformers. BCCA follows IP-Adapter-Plus' Resampler for SD 1.5 (768 wide, 12 heads, FFN x4); SACA uses the same
  block at 8 heads.
- ``lambda_fg``: the weight of Eq. 11, 0.5 (foreground and background branches count equally).
- ``mask_mode``: how a mask enters the softmax of Eq. 7 / Eq. 10. ``"bias"`` (default) weights each attention
  probability by ``M'`` and renormalises, i.e. adds ``log(M')`` to the logits (``-inf`` where ``M' = 0``), so at
  full strength a latent outside box i cannot see sub-instruction i at all. ``"literal"`` multiplies the logits by
  the mask as Eq. 7 is written; a zero logit still receives ``exp(0)`` of the probability mass, so that mode does not
  block attention and is kept only for ablations. See :mod:`model.masks` for the exact formulas.
- ``mask_resize``: how a box becomes a mask at each UNet resolution. ``"area"`` (default) is the exact fraction of
  each latent cell covered by the box (what area-downsampling the pixel mask gives, computed without a pixel mask;
  boundary cells get fractional weights, so a box never vanishes at 8 x 8). ``"nearest"`` rasterises the box at
  each resolution (a cell is in when its centre is; a box thinner than a cell keeps the cell holding its centre).
- ``timestep_schedule``: Eq. 8 on (``M' = M * exp(-t / T)``, ``T = num_train_timesteps`` of the scheduler, so the
  same ``t / T`` in [0, 1) is used in training and at any number of inference steps) or off (full strength always).
- ``schedule_form``: how Eq. 8 is read: ``"strength"`` (default; ``exp(-t/T)`` is the strength of the masking, the
  weight is ``1 - s (1 - M)``, so early steps open the outside of a box to its sub-instruction) or ``"literal"``
  (``M' = M * exp(-t/T)`` as written: a sub-instruction never reaches outside its box and is damped inside it early).
  Both are tabulated side by side in :mod:`model.masks`; the second is for ablations.
- ``background_schedule``: the gate of the background branch (Eq. 10): ``"plain"`` (default) ``1 - M_union`` as
  written, so BCCA's tokens never reach inside a box; ``"faded"`` ``1 - exp(-t/T) M_union``, which lets them in at
  weight up to 0.63 at the noisiest step (kept for ablations).
- ``base_text``: what the UNet's ordinary text tokens (its frozen ``to_k`` / ``to_v``) carry in the conditional
  branch: ``"instruction"`` (default) the whole complex instruction encoded as InstructPix2Pix would, which is what
  latents outside every box attend to, so there the foreground branch is InstructPix2Pix's cross-attention (the
  layer's output is still ``lambda * FG + (1 - lambda) * BG`` when BCCA is on); ``"null"`` the empty prompt, so
  outside the boxes the foreground branch sees no instruction.
- ``lora_rank`` / ``lora_alpha`` / ``lora_dropout``: 16 / 16 / 0, a common LoRA setting for SD 1.5 attention.
- ``clip_vision_model``: the open_clip architecture of BCCA's image encoder, ``"ViT-H-14"`` (the OpenCLIP ViT-H/14
  IP-Adapter-Plus uses with SD 1.5); ``clip_vision_model_config`` may give the architecture as an open_clip config
  dict instead (tests, custom towers); ``clip_vision_layer`` the transformer block whose patch tokens are used, -2
  (penultimate, as IP-Adapter-Plus; the last block's tokens after ``ln_post`` with -1 are also fine);
  ``clip_vision_checkpoint`` a default checkpoint path, overridable at load time.
- ``max_sub_instructions``: 8 slots (CIE-Bench has 1-4 sub-instructions); more is a clear error.
- ``use_saca`` / ``use_bcca``: the ablations of Table 4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["CONFIG_FORMAT", "MCIEConfig", "MaskMode", "MaskResize"]

CONFIG_FORMAT = "mcie-e1/1"

MaskMode = Literal["bias", "literal"]
MaskResize = Literal["area", "nearest"]


class MCIEConfig(BaseModel):
    """Every hyper-parameter of SACA, BCCA, the attention processors and the LoRA (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["mcie-e1/1"] = CONFIG_FORMAT
    use_saca: bool = True
    use_bcca: bool = True

    # SACA (Eq. 3-8)
    saca_queries: int = Field(2, ge=1)
    saca_layers: int = Field(2, ge=1)
    saca_width: int = Field(768, ge=1)
    saca_heads: int = Field(8, ge=1)
    fourier_freqs: int = Field(8, ge=1, le=16)
    max_sub_instructions: int = Field(8, ge=1)

    # BCCA (Eq. 9-10)
    bcca_queries: int = Field(16, ge=1)
    bcca_layers: int = Field(4, ge=1)
    bcca_width: int = Field(768, ge=1)
    bcca_heads: int = Field(12, ge=1)
    ff_mult: int = Field(4, ge=1)
    clip_vision_model: str = "ViT-H-14"
    clip_vision_model_config: dict[str, Any] | None = None
    clip_vision_layer: int = -2
    clip_vision_checkpoint: str | None = None

    # attention processors (Eq. 7, 8, 10, 11)
    lambda_fg: float = Field(0.5, ge=0.0, le=1.0)
    mask_mode: MaskMode = "bias"
    mask_resize: MaskResize = "area"
    timestep_schedule: bool = True
    schedule_form: Literal["strength", "literal"] = "strength"
    background_schedule: Literal["plain", "faded"] = "plain"
    base_text: Literal["instruction", "null"] = "instruction"

    # LoRA on the self-attention layers
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_heads(self) -> MCIEConfig:
        for width, heads, name in (
            (self.saca_width, self.saca_heads, "saca"),
            (self.bcca_width, self.bcca_heads, "bcca"),
        ):
            if width % heads:
                raise ValueError(f"{name}_width ({width}) must be a multiple of {name}_heads ({heads})")
        if self.clip_vision_layer == 0:
            raise ValueError("clip_vision_layer: use a negative index from the end (-1 = last block) or a positive one")
        return self

    # --- JSON ---------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> MCIEConfig:
        """Parse a config; a bad value is a ``ValueError`` naming ``source`` and the key."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise ValueError(f"{source}: invalid MCIE config ({problems})") from exc

    @classmethod
    def load(cls, path: str | Path) -> MCIEConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MCIE config not found: {path}")
        return cls.from_json(path.read_text(encoding="utf-8"), source=str(path))
