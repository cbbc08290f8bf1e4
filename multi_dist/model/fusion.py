"""Text-Guided MultiWay-Sampler and MultiWay fusion (paper v2).

- :class:`AdaptPooling` condenses a long sequence into K tokens: contiguous blocks, tokens
  weighted by a softmax of importance scores inside each block. For video the scores come from
  the text (``a_i = <Wq g, Wk s_i> / sqrt(D)``), computed as ``s_i . (Wk^T Wq g)`` so that no
  ``(N, D)`` key projection of the long sequence is ever materialised.
- :class:`SamplerLayer`: residual mapping ``P' = P + MHA(LN(P), LN(S))``, ``P'' = P' + FFN_m(LN(P'))``
  with the attention shared by all modalities and a feed-forward network per modality.
- :class:`MultiWayLayer`: one self-attention over ``[text ; video]``, then the text FFN on text
  positions and the video FFN on video positions.

Pooling uses reshape + softmax + sum, never ``adaptive_avg_pool1d`` (it fails with an internal
assert on CUDA for long bf16 inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FusionConfig:
    width: int = 768
    """Fusion width D (both modalities are projected to it)."""
    layers: int = 6
    """MultiWay fusion layers."""
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    sampler: Literal["multiway", "none"] = "multiway"
    """``none`` keeps every video token (dense concat): only the memory benchmark's baseline."""
    sampler_layers: int = 1
    video_tokens: int = 64
    """K_v: video is condensed to this many tokens whatever the frame count."""
    text_tokens: int = 64
    """K_t: longer text is condensed to this many tokens (plus its CLS); shorter passes whole."""

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        for name in ("layers", "video_tokens", "text_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.sampler_layers < 0:
            raise ValueError("sampler_layers must be >= 0")


class Attention(nn.Module):
    """Multi-head attention on ``scaled_dot_product_attention`` (flash / memory-efficient kernels)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, M, D) attends to ``context`` (B, N, D); ``key_mask`` (B, N) is True where real."""
        b, m, d = x.shape
        h = self.heads
        q = self.q(x).view(b, m, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = key_mask[:, None, None, :].bool() if key_mask is not None else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, m, d))


def mlp(width: int, ratio: float, dropout: float) -> nn.Sequential:
    hidden = int(width * ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))


class AdaptPooling(nn.Module):
    """Condense ``S (B, N, D)`` to ``K`` tokens, one per contiguous block, weighted by a softmax of
    guide-dependent importance scores within each block."""

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.query = nn.Linear(width, width, bias=False)
        self.key = nn.Linear(width, width, bias=False)

    def forward(
        self, s: torch.Tensor, mask: torch.Tensor, guide: torch.Tensor, packed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``s`` (B, N, D), ``mask`` (B, N) real tokens, ``guide`` (B, G, D): G guides per sequence
        (e.g. the 4 MCM options of one video) share one pass over ``s``.

        ``packed``: the blocks are cut from each row's real tokens alone (``ceil(n_real / K)``
        per block, in order), so padding - the frames an image or a short clip is padded with -
        changes nothing: a row pools as it would alone at its own length. Otherwise the blocks
        are fixed positions of the padded sequence.

        Returns pooled ``(B, G, K, D)``, their mask ``(B, K)`` and the weights ``(B, G, N)``.
        """
        b, n, d = s.shape
        k = self.tokens
        block = math.ceil(n / k)
        pad = k * block - n
        mask = mask.bool()
        slot = None
        if packed:
            s, mask, slot = _pack(s, mask, k, block)
        elif pad:
            s = F.pad(s, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad), value=False)
        u = self.query(guide) @ self.key.weight  # (B, G, D): Wk^T Wq g
        scores = torch.einsum("bnd,bgd->bgn", s, u) / math.sqrt(d)
        scores = scores.float().masked_fill(~mask[:, None, :], torch.finfo(torch.float32).min)
        weights = scores.view(b, -1, k, block).softmax(-1) * mask.view(b, 1, k, block)
        # blocks with no real token (short clips, padding) pool to zero and are masked out
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
        weights = weights.to(s.dtype)
        pooled = torch.einsum("bgkj,bkjd->bgkd", weights, s.view(b, k, block, d))
        weights = weights.flatten(2)
        if slot is None:
            weights = weights[..., :n]
        else:  # back to the tokens' own positions (padding tokens: weight 0)
            weights = F.pad(weights, (0, n)).gather(2, slot[:, None, :].expand(-1, weights.shape[1], -1))
        return pooled, mask.view(b, k, block).any(-1), weights


def _pack(s: torch.Tensor, mask: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay each row's real tokens out in K blocks of ``ceil(n_real / K)`` (the first slots of
    blocks ``block`` wide): the layout that row would have alone, padded to the batch's block
    width. Returns the packed ``s`` (B, K*block, D) (empty slots zero), its mask, and each
    token's slot (B, N) (padding token j: slot K*block + j, past the end, dropped; every slot is
    written once, so the scatter is deterministic). One ``index_select`` on the flattened
    tokens: backward keeps a (B*K*block,) index, not one per feature."""
    b, n, d = s.shape
    size = k * block
    real = mask.long()
    rank = real.cumsum(1) - 1  # place among the row's real tokens
    per = ((real.sum(1, keepdim=True) + k - 1) // k).clamp_min(1)  # the row's own block length (<= block)
    position = torch.arange(n, device=s.device)
    slot = torch.where(mask, (rank // per) * block + rank % per, size + position)
    # which flat token fills each slot: b*n (an appended zero row) where none does
    source = torch.full((b, size + n), b * n, dtype=torch.long, device=s.device)
    source = source.scatter(1, slot, position + n * torch.arange(b, device=s.device)[:, None])[:, :size]
    flat = torch.cat([s.reshape(b * n, d), s.new_zeros(1, d)])
    packed = flat.index_select(0, source.flatten()).view(b, size, d)
    return packed, source.ne(b * n), slot


class SamplerLayer(nn.Module):
    """Residual cross-attention of the pooled tokens to the full sequence; the attention module is
    shared across modalities (passed in), the norms and FFN are per modality."""

    def __init__(self, width: int, mlp_ratio: float, dropout: float, attention: Attention) -> None:
        super().__init__()
        self.attention = attention
        self.norm_q = nn.ModuleDict({m: nn.LayerNorm(width) for m in ("video", "text")})
        self.norm_kv = nn.ModuleDict({m: nn.LayerNorm(width) for m in ("video", "text")})
        self.norm_ffn = nn.ModuleDict({m: nn.LayerNorm(width) for m in ("video", "text")})
        self.ffn = nn.ModuleDict({m: mlp(width, mlp_ratio, dropout) for m in ("video", "text")})

    def forward(self, p: torch.Tensor, s: torch.Tensor, s_mask: torch.Tensor, modality: str) -> torch.Tensor:
        """``p`` (B, G*K, D) pooled tokens of G guides, ``s`` (B, N, D) the sequence they came from."""
        p = p + self.attention(self.norm_q[modality](p), self.norm_kv[modality](s), s_mask)
        return p + self.ffn[modality](self.norm_ffn[modality](p))


class MultiWayLayer(nn.Module):
    """Shared self-attention over ``[text ; video]``, then a feed-forward network per modality."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.attention = Attention(width, heads, dropout)
        self.norm1 = nn.ModuleDict({m: nn.LayerNorm(width) for m in ("video", "text")})
        self.norm2 = nn.ModuleDict({m: nn.LayerNorm(width) for m in ("video", "text")})
        self.ffn = nn.ModuleDict({m: mlp(width, mlp_ratio, dropout) for m in ("video", "text")})

    def forward(self, z: torch.Tensor, mask: torch.Tensor, n_text: int) -> torch.Tensor:
        x = torch.cat([self.norm1["text"](z[:, :n_text]), self.norm1["video"](z[:, n_text:])], 1)
        z = z + self.attention(x, x, mask)
        zt, zv = z[:, :n_text], z[:, n_text:]
        zt = zt + self.ffn["text"](self.norm2["text"](zt))
        zv = zv + self.ffn["video"](self.norm2["video"](zv))
        return torch.cat([zt, zv], 1)
