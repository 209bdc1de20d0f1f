"""SACA's token side (paper Eq. 3-6): Fourier box embedding, learnable-query transformer, per-sub-instruction contexts.

- ``FourierBoxEmbedding`` is Eq. 5, ``F(B) = [sin(2 pi B f_k), cos(2 pi B f_k)]`` with ``f_k = 2**k``. We keep the
  four coordinates apart, so a box becomes 4 tokens (one per coordinate x0, y0, x1, y1, each ``2K`` features plus a
  learned coordinate embedding after projection): the learnable queries then have something to attend over, rather
  than a single token whose softmax is trivially 1.
- ``QueryTransformer`` is ``Q_beta``: ``n`` learnable queries refined by ``L`` pre-norm blocks, each a cross-attention
  from the queries to ``[context ; queries]`` followed by a feed-forward layer (the Perceiver-Resampler block that
  IP-Adapter-Plus uses), then a projection to the UNet's cross-attention width and a LayerNorm. BCCA
  (:mod:`model.bcca`) uses the same class with 16 queries and 4 blocks.
- ``SpatialContext`` builds ``C_i = [T_i, Q_beta(F(B_i))]`` (Eq. 6): ``T_i`` are the CLIP text encoder's 77 hidden
  states of sub-instruction i encoded on its own (Eq. 3), in the UNet's cross-attention space already; the
  ``saca_queries`` spatial tokens are projected into that space. The box alone drives the spatial tokens (Eq. 6); the
  operation type is not embedded separately, the sub-instruction's text carries it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeedForward", "FourierBoxEmbedding", "QueryAttention", "QueryTransformer", "SpatialContext"]


class FourierBoxEmbedding(nn.Module):
    """Eq. 5 per coordinate: ``(..., 4) -> (..., 4, 2 * num_freqs)``."""

    def __init__(self, num_freqs: int) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False)

    @property
    def dim(self) -> int:
        return 2 * self.num_freqs

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * boxes.float()[..., None] * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class QueryAttention(nn.Module):
    """Pre-norm multi-head attention from queries to ``[context ; queries]`` (Perceiver-Resampler style)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_context = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        normed = self.norm_queries(queries)
        keys_in = torch.cat([self.norm_context(context), normed], dim=1)
        key, value = self.to_kv(keys_in).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self._split(self.to_q(normed)), self._split(key), self._split(value))
        return self.to_out(out.transpose(1, 2).flatten(2))


class QueryTransformer(nn.Module):
    """``Q_beta``: ``(B, L, dim)`` context tokens -> ``(B, num_queries, out_dim)`` tokens."""

    def __init__(self, num_queries: int, num_layers: int, dim: int, heads: int, ff_mult: int, out_dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) / math.sqrt(dim))
        self.attentions = nn.ModuleList(QueryAttention(dim, heads) for _ in range(num_layers))
        self.feed_forwards = nn.ModuleList(FeedForward(dim, ff_mult) for _ in range(num_layers))
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(context.shape[0], -1, -1).to(context.dtype)
        for attention, feed_forward in zip(self.attentions, self.feed_forwards, strict=True):
            queries = queries + attention(context, queries)
            queries = queries + feed_forward(queries)
        return self.norm_out(self.proj_out(queries))


class SpatialContext(nn.Module):
    """SACA's learned part: boxes -> spatial tokens, and the contexts ``C_i = [T_i, spatial tokens]`` (Eq. 6)."""

    def __init__(
        self, cross_attention_dim: int, num_queries: int, num_layers: int, width: int, heads: int, num_freqs: int,
        ff_mult: int,
    ) -> None:
        super().__init__()
        self.fourier = FourierBoxEmbedding(num_freqs)
        self.proj_in = nn.Linear(self.fourier.dim, width)
        self.coordinate_embedding = nn.Parameter(torch.randn(4, width) / math.sqrt(width))
        self.transformer = QueryTransformer(num_queries, num_layers, width, heads, ff_mult, cross_attention_dim)
        self.num_queries = num_queries

    def spatial_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, m, 4)`` normalised boxes -> ``(B, m, num_queries, cross_attention_dim)``."""
        batch, slots = boxes.shape[:2]
        dtype = self.proj_in.weight.dtype
        coords = self.proj_in(self.fourier(boxes.reshape(-1, 4)).to(dtype)) + self.coordinate_embedding.to(dtype)
        return self.transformer(coords).reshape(batch, slots, self.num_queries, -1)

    def forward(self, text_tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``T: (B, m, L, D)`` and boxes ``(B, m, 4)`` -> ``C: (B, m, L + num_queries, D)``."""
        spatial = self.spatial_tokens(boxes)
        if spatial.shape[-1] != text_tokens.shape[-1]:
            raise ValueError(
                f"text tokens have width {text_tokens.shape[-1]} but the spatial tokens {spatial.shape[-1]}"
            )
        return torch.cat([text_tokens, spatial.to(text_tokens.dtype)], dim=2)
