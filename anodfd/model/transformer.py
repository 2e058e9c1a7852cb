"""A ViT-style Transformer over the deepest feature-difference map (one token per spatial position)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention on `F.scaled_dot_product_attention` (fused kernels, no explicit softmax)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp: int, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp, drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DifferenceTransformer(nn.Module):
    """Embed each position of a BxCxhxw map as a token, run `depth` blocks, return a Bx`hidden`xhxw map.

    The token embedding is the official 1x1 "patch embedding" (written as a Linear on tokens). The
    position embedding is learned for `grid` (the deepest map of a `config.image_size` input) and
    bicubically interpolated for other input sizes. Dropout follows the official code: 0.2 on the
    embedded tokens, 0.1 inside the MLP.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        depth: int,
        heads: int,
        mlp: int,
        grid: tuple[int, int],
        embed_drop: float = 0.2,
        mlp_drop: float = 0.1,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.hidden = hidden
        self.embed = nn.Linear(in_channels, hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], hidden))
        self.embed_drop = nn.Dropout(embed_drop)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp, mlp_drop) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, h: int, w: int) -> Tensor:
        """The 1x(h*w)xhidden position embedding for an hxw grid."""
        if (h, w) == self.grid:
            return self.pos_embed
        pos = self.pos_embed.reshape(1, *self.grid, self.hidden).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        # (B, C, h, w) -> (B, h*w, C); a free view when x is channels_last.
        tokens = x.flatten(2).transpose(1, 2)
        tokens = self.embed_drop(self.embed(tokens) + self.position_embedding(h, w))
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        # Back to (B, hidden, h, w) without a copy: the result is a channels_last tensor.
        return tokens.view(b, h, w, self.hidden).permute(0, 3, 1, 2)
