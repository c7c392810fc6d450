"""HybridViT in PyTorch: the twin of jaxcell.models.hybrid (the architecture is described
there), same names and constructor arguments. Attention is torch's own nn.MultiheadAttention
(batch_first), so the packed in_proj weights are what the parity converter handles."""

from collections.abc import Sequence

import torch
import torch.nn as nn

from jaxcell.twins import HYBRID_PATCH as PATCH, hybrid_config as check_config  # plain Python: no jax
from jaxcell.twins import hybrid_reduction as reduction
from torch_ref.preprocessing import resize

LN_EPS = 1e-5


class ConvStage(nn.Module):
    def __init__(self, in_channels: int, features: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, features, 3, padding=1)
        self.bn = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.bn(torch.relu(self.conv(x))))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="none")
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class EncoderLayer(nn.Module):
    """Pre-norm: x + drop(attn(norm1(x))), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, attention_dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=attention_dropout, bias=True, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.drop(self.attn(y, y, y, need_weights=False)[0])
        return x + self.mlp(self.norm2(x))


class HybridViT(nn.Module):
    def __init__(self, num_classes: int = 4, image_size: int = 224, widths: Sequence[int] = (32, 64, 128),
                 dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.1,
                 attention_dropout: float = 0.0, pos_image_size: int | None = None):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        self.grid = check_config(image_size, widths, dim, depth, heads, mlp_ratio, pos_image_size)
        channels = 3
        for i, width in enumerate(widths, start=1):
            setattr(self, f"stage{i}", ConvStage(channels, width))
            channels = width
        self.num_stages = len(widths)
        self.patch_embed = nn.Conv2d(channels, dim, PATCH, PATCH)
        self.pos_embed = nn.Parameter(torch.empty(1, self.grid * self.grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)  # flax truncates at 2 std too
        self.pos_drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, mlp_ratio, dropout, attention_dropout)
                                     for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, num_classes)

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, dim): the stored embeddings, resized to an h x w token grid if it differs."""
        g, pos = self.grid, self.pos_embed
        if (h, w) == (g, g):
            return pos
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        return resize(grid, (h, w), "bilinear").permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = reduction(self.num_stages)
        if min(x.shape[2:]) < r:
            raise ValueError(f"hybrid_vit needs images of at least {r}x{r} pixels, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        x = self.patch_embed(x)
        h, w = x.shape[2:]
        x = self.pos_drop(x.flatten(2).transpose(1, 2) + self.position_embeddings(h, w))
        for layer in self.encoder:
            x = layer(x)
        return self.head(self.norm(x).mean(1))
