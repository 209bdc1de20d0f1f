"""MCIE-E1's decoupled cross-attention as diffusers attention processors (paper Eq. 7, 10, 11; IP-Adapter style).

``install_processors(unet, config)`` puts an :class:`MCIEAttnProcessor` on every cross-attention layer (``attn2``)
and an :class:`MCIESelfAttnProcessor` (plain ``AttnProcessor2_0`` that accepts and ignores the MCIE inputs, so
diffusers does not warn about them) on every self-attention layer (``attn1``, where the LoRA goes). The inputs
travel as ``unet(..., cross_attention_kwargs={"mcie": MCIEAttentionInputs(...)})``; without them, or with neither
sub-instructions nor background tokens, the processor is ``AttnProcessor2_0`` exactly (plain InstructPix2Pix).

Per cross-attention layer, with ``Q = to_q(z_t)``:

- FG (SACA, Eq. 7): one attention call over the keys ``[to_k(T_base) ; W_k(C_1) ; ... ; W_k(C_m)]`` (values alike)
  with an additive mask bias built once per UNet level (:meth:`MCIEAttentionInputs.foreground_bias`, formulas in
  :mod:`model.masks`): inside box i a latent sees sub-instruction i's context, outside every box the base text.
  Batching the sub-instructions into one call with a block mask (instead of a loop of m softmaxes) keeps the extra
  cost to a longer key sequence. Samples without any valid sub-instruction (the unconditional branches of
  guidance, dropped conditions in training) skip the SACA keys and get plain attention over the base text.
  ``W_k`` / ``W_v`` (``to_k_sub`` / ``to_v_sub``) are shared by all sub-instructions (the paper's ``W_{k_i}``):
  sub-instructions are an unordered set and their own spatial tokens tell them apart, so per-slot weights would
  only make the model depend on the order the MLLM lists them in.
- BG (BCCA, Eq. 10): attention over the background tokens with their own ``to_k_bg`` / ``to_v_bg``, its output
  multiplied by ``1 - M_union`` per position (``1 - s * M_union`` with ``background_schedule = "faded"``; see
  :mod:`model.masks` for why the gate is on the output).
- Fusion (Eq. 11): ``lambda * FG + (1 - lambda) * BG`` before the layer's ``to_out``, as IP-Adapter adds its branch
  before ``to_out``. Without background tokens (SACA-only ablation) the output is FG.

The new projections are initialised from the layer's frozen ``to_k`` / ``to_v`` (IP-Adapter's initialisation), so
an untrained model already reads a sub-instruction's text tokens as the base UNet reads text. ``mask_mode =
"literal"`` multiplies the logits by the weights instead (Eq. 7 / 10 as written; an explicit softmax, for ablations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from mcie.model.config import MCIEConfig
from mcie.model.masks import background_gate, foreground_weights, latent_grid, masks_at

__all__ = [
    "MCIEAttentionInputs",
    "MCIEAttnProcessor",
    "MCIESelfAttnProcessor",
    "cross_attention_processors",
    "install_processors",
]


@dataclass
class MCIEAttentionInputs:
    """The MCIE conditioning of one UNet call; every tensor has the UNet batch as its first dimension.

    ``sub_context: (B, m, L, D)`` SACA contexts ``C_i``; ``sub_valid: (B, m)`` which slots are real; ``boxes:
    (B, m, 4)``; ``box_mask: (B, m, H, W)`` optional pixel masks used instead of the boxes; ``background:
    (B, Q, D)`` BCCA tokens; ``strength: (B,)`` the Eq. 8 factor; ``latent_hw`` the UNet input's latent size.
    """

    latent_hw: tuple[int, int]
    strength: torch.Tensor
    sub_context: torch.Tensor | None = None
    sub_valid: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    box_mask: torch.Tensor | None = None
    background: torch.Tensor | None = None
    mask_mode: str = "bias"
    mask_resize: str = "area"
    schedule_form: str = "strength"
    background_faded: bool = False
    _cache: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        batch = self.strength.shape[0]
        if self.sub_context is not None:
            if self.sub_context.ndim != 4:
                raise ValueError(f"sub_context: expected (B, m, L, D), got {tuple(self.sub_context.shape)}")
            slots = tuple(self.sub_context.shape[:2])
            for name in ("sub_valid", "boxes"):
                value = getattr(self, name)
                if value is None or tuple(value.shape[:2]) != slots:
                    got = None if value is None else tuple(value.shape)
                    raise ValueError(f"{name}: expected leading shape {slots} to match sub_context, got {got}")
        for name in ("sub_context", "background"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != batch:
                raise ValueError(f"{name}: batch {value.shape[0]} but {batch} timesteps/strengths")
        if self.mask_mode not in ("bias", "literal"):
            raise ValueError(f"mask_mode: expected 'bias' or 'literal', got {self.mask_mode!r}")
        if self.schedule_form not in ("strength", "literal"):
            raise ValueError(f"schedule_form: expected 'strength' or 'literal', got {self.schedule_form!r}")

    @property
    def has_sub_instructions(self) -> bool:
        return self.sub_context is not None and self.sub_context.shape[1] > 0

    @property
    def is_empty(self) -> bool:
        return not self.has_sub_instructions and self.background is None

    def _cached(self, key: tuple[Any, ...], build: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def slot_masks(self, tokens: int) -> torch.Tensor:
        """``(B, m, tokens)`` float32 masks of the sub-instructions at the UNet level with ``tokens`` positions."""

        def build() -> torch.Tensor:
            height, width = latent_grid(tokens, self.latent_hw)
            assert self.boxes is not None
            masks = masks_at(self.boxes, height, width, self.mask_resize, self.box_mask)
            return masks.flatten(-2).to(self.strength.device)

        return self._cached(("masks", tokens), build)

    def _valid(self) -> torch.Tensor:
        assert self.sub_valid is not None
        return self.sub_valid.to(self.strength.device).bool()

    def sub_rows(self) -> torch.Tensor:
        """Indices of the samples with at least one valid sub-instruction (the others need no SACA keys)."""
        return self._cached(("rows",), lambda: self._valid().any(dim=1).nonzero().flatten())

    def foreground_weights(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Base and per-slot weights (:func:`model.masks.foreground_weights`) of the :meth:`sub_rows` samples."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            rows = self.sub_rows()
            return foreground_weights(self.slot_masks(tokens)[rows], self._valid()[rows], self.strength[rows],
                                      self.schedule_form)

        return self._cached(("fg", tokens), build)

    def _token_weights(self, tokens: int, n_base: int, n_slot: int) -> torch.Tensor:
        """Weights per key of the :meth:`sub_rows` samples: ``(rows, 1, tokens, n_base + m * n_slot)`` float32."""
        base, slot = self.foreground_weights(tokens)
        per_key = [base[:, :, None].expand(-1, -1, n_base), slot.transpose(1, 2).repeat_interleave(n_slot, dim=2)]
        return torch.cat(per_key, dim=2)[:, None]

    def foreground_bias(self, tokens: int, n_base: int, n_slot: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive bias ``log(weight)`` (``-inf`` at weight 0) for ``F.scaled_dot_product_attention``."""
        return self._cached(
            ("bias", tokens, n_base, n_slot, dtype),
            lambda: self._token_weights(tokens, n_base, n_slot).log().to(dtype),
        )

    def foreground_literal(
        self, tokens: int, n_base: int, n_slot: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit multipliers (Eq. 7 as written) and a ``-inf`` bias that removes padding slots."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            weights = self._token_weights(tokens, n_base, n_slot)
            valid = self._valid()[self.sub_rows()]
            keys = torch.cat(
                [torch.ones_like(valid[:, :1]).expand(-1, n_base), valid.repeat_interleave(n_slot, dim=1)], dim=1
            )
            pad = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device).masked_fill(~keys, float("-inf"))
            return weights.to(dtype), pad[:, None, None].to(dtype)

        return self._cached(("literal", tokens, n_base, n_slot, dtype), build)

    def background_gate(self, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, tokens, 1)``: ``1 - M_union`` per position (``1 - s * M_union`` when faded; ones without
        sub-instructions)."""

        def build() -> torch.Tensor:
            if not self.has_sub_instructions:
                return torch.ones(self.strength.shape[0], 1, tokens, 1, dtype=dtype, device=self.strength.device)
            gate = background_gate(self.slot_masks(tokens), self._valid(), self.strength, self.background_faded)
            return gate[:, None, :, None].to(dtype)

        return self._cached(("gate", tokens, dtype), build)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _weighted_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, weights: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax((Q K^T * scale) * weights + bias) V`` — the literal reading of Eq. 7 / 10."""
    logits = (query @ key.transpose(-1, -2)) * scale * weights
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).to(value.dtype) @ value


class MCIESelfAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` that accepts (and ignores) the ``mcie`` cross-attention kwarg, for ``attn1`` layers."""

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        mcie: MCIEAttentionInputs | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class MCIEAttnProcessor(nn.Module):
    """SACA + BCCA cross-attention for one ``attn2`` layer (see the module docstring)."""

    def __init__(
        self, hidden_size: int, cross_attention_dim: int, lambda_fg: float = 0.5, use_saca: bool = True,
        use_bcca: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.lambda_fg = lambda_fg
        self.to_k_sub = nn.Linear(cross_attention_dim, hidden_size, bias=False) if use_saca else None
        self.to_v_sub = nn.Linear(cross_attention_dim, hidden_size, bias=False) if use_saca else None
        self.to_k_bg = nn.Linear(cross_attention_dim, hidden_size, bias=False) if use_bcca else None
        self.to_v_bg = nn.Linear(cross_attention_dim, hidden_size, bias=False) if use_bcca else None
        self._plain = AttnProcessor2_0()

    @torch.no_grad()
    def init_from(self, attn: Attention) -> None:
        """Copy the layer's ``to_k`` / ``to_v`` into the new projections (IP-Adapter's initialisation)."""
        for new, base in ((self.to_k_sub, attn.to_k), (self.to_v_sub, attn.to_v), (self.to_k_bg, attn.to_k),
                          (self.to_v_bg, attn.to_v)):
            if new is not None:
                new.weight.copy_(base.weight)

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        mcie: MCIEAttentionInputs | None = None,
    ) -> torch.Tensor:
        if mcie is None or mcie.is_empty or encoder_hidden_states is None:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None:
            raise ValueError("MCIEAttnProcessor: an encoder attention_mask cannot be combined with MCIE inputs")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        q = _heads(query, attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        tokens = hidden_states.shape[1]
        out = self._foreground(attn, q, encoder_hidden_states, mcie, tokens)
        if mcie.background is not None and self.to_k_bg is not None:
            background = self._background(attn, q, mcie, tokens)
            out = self.lambda_fg * out + (1 - self.lambda_fg) * background

        out = out.transpose(1, 2).reshape(q.shape[0], -1, attn.heads * q.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _keys(self, attn: Attention, x: torch.Tensor, to_k: nn.Module, to_v: nn.Module) -> tuple[torch.Tensor, ...]:
        key, value = _heads(to_k(x), attn.heads), _heads(to_v(x), attn.heads)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return key, value

    def _foreground(
        self, attn: Attention, q: torch.Tensor, text: torch.Tensor, mcie: MCIEAttentionInputs, tokens: int
    ) -> torch.Tensor:
        key, value = self._keys(attn, text, attn.to_k, attn.to_v)
        if not mcie.has_sub_instructions or self.to_k_sub is None or self.to_v_sub is None:
            return F.scaled_dot_product_attention(q, key, value)
        rows = mcie.sub_rows()
        if rows.numel() == q.shape[0]:
            return self._masked_foreground(attn, q, key, value, mcie, tokens)
        # samples without sub-instructions (e.g. the unconditional branches of guidance) need no SACA keys at all
        plain = F.scaled_dot_product_attention(q, key, value)
        if rows.numel() == 0:
            return plain
        masked = self._masked_foreground(attn, q[rows], key[rows], value[rows], mcie, tokens)
        return plain.index_copy(0, rows, masked)

    def _masked_foreground(
        self, attn: Attention, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mcie: MCIEAttentionInputs,
        tokens: int,
    ) -> torch.Tensor:
        """Eq. 7 for the :meth:`MCIEAttentionInputs.sub_rows` samples: one call over base + all ``C_i`` keys."""
        assert mcie.sub_context is not None and self.to_k_sub is not None and self.to_v_sub is not None
        n_base, n_slot = key.shape[2], mcie.sub_context.shape[2]
        context = mcie.sub_context[mcie.sub_rows()].to(q.dtype).flatten(1, 2)
        sub_key, sub_value = self._keys(attn, context, self.to_k_sub, self.to_v_sub)
        key, value = torch.cat([key, sub_key], dim=2), torch.cat([value, sub_value], dim=2)
        if mcie.mask_mode == "literal":
            weights, pad = mcie.foreground_literal(tokens, n_base, n_slot, q.dtype)
            return _weighted_attention(q, key, value, attn.scale, weights, pad)
        bias = mcie.foreground_bias(tokens, n_base, n_slot, q.dtype)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=bias)

    def _background(self, attn: Attention, q: torch.Tensor, mcie: MCIEAttentionInputs, tokens: int) -> torch.Tensor:
        assert mcie.background is not None and self.to_k_bg is not None and self.to_v_bg is not None
        key, value = self._keys(attn, mcie.background.to(q.dtype), self.to_k_bg, self.to_v_bg)
        gate = mcie.background_gate(tokens, q.dtype)
        if mcie.mask_mode == "literal":
            return _weighted_attention(q, key, value, attn.scale, gate)
        return F.scaled_dot_product_attention(q, key, value) * gate


def install_processors(unet: nn.Module, config: MCIEConfig) -> dict[str, MCIEAttnProcessor]:
    """Install the MCIE processors on ``unet`` (see the module docstring); returns the cross-attention ones by name."""
    processors: dict[str, Any] = {}
    cross: dict[str, MCIEAttnProcessor] = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if not attn.is_cross_attention:
            processors[name] = MCIESelfAttnProcessor()
            continue
        processor = MCIEAttnProcessor(
            attn.inner_dim, attn.cross_attention_dim, config.lambda_fg, config.use_saca, config.use_bcca
        )
        processor.init_from(attn)
        processor.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
        processors[name] = cross[name] = processor
    unet.set_attn_processor(processors)
    return cross


def cross_attention_processors(unet: nn.Module) -> dict[str, MCIEAttnProcessor]:
    """The installed :class:`MCIEAttnProcessor` modules by processor name (empty for a plain UNet)."""
    return {name: p for name, p in unet.attn_processors.items() if isinstance(p, MCIEAttnProcessor)}
