"""A tiny vision transformer written here (timm is not needed), a user's own module: a conv
patch embedding, a class token (and optional register tokens) before the patch tokens,
position embeddings, pre-norm ``nn.TransformerEncoderLayer`` blocks, a linear head on the
class token. Imported as ``tiny_vit`` (also a ``py:tiny_vit:tiny_vit`` model source)."""

import torch
from torch import nn


class TinyViT(nn.Module):
    def __init__(self, num_classes: int = 4, in_channels: int = 1, input_size: int = 16,
                 patch: int = 4, dim: int = 16, depth: int = 2, heads: int = 2,
                 registers: int = 0, declare_prefix: bool = False,
                 batch_first: bool = True) -> None:
        super().__init__()
        grid = input_size // patch
        self.prefix = 1 + registers
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, self.prefix, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.prefix + grid * grid, dim) * 0.02)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                       batch_first=batch_first, norm_first=True)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.batch_first = batch_first
        if declare_prefix:
            self.num_prefix_tokens = self.prefix  # as timm's models declare it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, h·w, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.blocks(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(self.norm(x)[:, 0])


def tiny_vit(num_classes: int, in_channels: int, input_size: int, patch: int = 4,
             dim: int = 16, depth: int = 2) -> TinyViT:
    return TinyViT(num_classes, in_channels, input_size, patch, dim, depth)
