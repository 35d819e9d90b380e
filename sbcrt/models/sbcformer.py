"""SBCFormer (Lu, Suganuma, Okatani, WACV 2024), written from the architecture facts in the spec.

Module and parameter names follow the authors' checkpoints exactly (including the two aliased modules,
`patch_embed` = `merging_blocks.0` and `sbcformer_blk` = `sbcformer_blocks.<last>`), so their state_dicts
load with strict=True and a state_dict saved from here has their keys in their order.

Classes that hold a convolution followed by a BatchNorm list the pair in FOLD_PAIRS; the export stage folds
them (sbcrt.export.fold) without this file knowing about export.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GRID = 7  # the attention is wired for a 7x7 token grid (stage maps 28, 14, 7 at 224x224 input)


@dataclass(frozen=True)
class SBCFormerConfig:
    embed_dims: tuple[int, int, int]
    key_dim: int
    num_heads: tuple[int, int, int]
    invres_ratio: int
    depths_mattn: tuple[int, int, int]
    attn_ratio: int = 2
    mlp_ratio: int = 4
    pool_ratios: tuple[int, int, int] = (4, 2, 1)
    depths_invres: tuple[int, int, int] = (2, 2, 1)
    depths_mixer: tuple[int, int, int] = (2, 2, 2)


VARIANTS = {
    "xs": SBCFormerConfig((96, 160, 288), 16, (3, 5, 6), 2, (2, 3, 2)),
    "s": SBCFormerConfig((96, 192, 320), 16, (3, 5, 7), 2, (2, 4, 3)),
    "b": SBCFormerConfig((128, 256, 384), 24, (4, 6, 8), 2, (2, 4, 3)),
    "l": SBCFormerConfig((192, 288, 384), 32, (4, 6, 8), 4, (2, 4, 3)),
}


class Conv2dBN(nn.Module):
    """Conv2d without bias, then BatchNorm2d (eps 1e-5)."""

    FOLD_PAIRS = (("conv", "bn"),)

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Stem(nn.Module):
    """Three 3x3 stride-2 Conv2d_BN + ReLU: 3 -> C/4 -> C/2 -> C, a 224 input becomes a 28x28 map."""

    def __init__(self, dim: int):
        super().__init__()
        self.stem = nn.Sequential(
            Conv2dBN(3, dim // 4, 3, 2, 1),
            nn.ReLU(),
            Conv2dBN(dim // 4, dim // 2, 3, 2, 1),
            nn.ReLU(),
            Conv2dBN(dim // 2, dim, 3, 2, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


class PatchMerging(nn.Module):
    """3x3 stride-2 conv then BatchNorm between stages (norm registered first, as in the checkpoints)."""

    FOLD_PAIRS = (("conv", "norm"),)

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cout)
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class InvRes(nn.Module):
    """Inverted residual: 1x1 up, GELU, 3x3 depthwise, GELU, 1x1 down, plus the input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pwconv1_bn = Conv2dBN(dim, hidden)
        self.dwconv_bn = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.pwconv2_bn = Conv2dBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.pwconv1_bn(x))
        y = F.gelu(self.dwconv_bn(y))
        return x + self.pwconv2_bn(y)


def attention_bias_indices(grid: int = GRID) -> torch.Tensor:
    """For each ordered pair of grid points (row-major), the index of its offset (|dr|, |dc|),
    numbered in order of first appearance."""
    points = list(itertools.product(range(grid), range(grid)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    return torch.tensor(idxs, dtype=torch.int64).view(len(points), len(points))


class Attention(nn.Module):
    """Modulated attention on the 49 tokens of a 7x7 map: q/k/v from one 1x1 conv, v refined by a
    depthwise conv, learned relative-position biases added to the scores."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.nh_kd = key_dim * num_heads
        self.d_v = attn_ratio * key_dim
        self.v_dim = self.d_v * num_heads
        idxs = attention_bias_indices(GRID)
        # Registered in the checkpoints' order: the parameter, then the index buffer, then the layers.
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, int(idxs.max()) + 1))
        self.register_buffer("attention_bias_idxs", idxs)
        self.pwconv = nn.Conv2d(dim, 2 * self.nh_kd + self.v_dim, 1)
        self.dwconv = Conv2dBN(self.v_dim, self.v_dim, 3, 1, 1, groups=self.v_dim)
        self.proj_out = nn.Linear(self.v_dim, dim)
        # Set by freeze_bias() for export. The bias is otherwise gathered from the live parameter on every
        # call: the authors cache it when .eval() is called, which goes stale if weights load afterwards.
        self.frozen_bias: torch.Tensor | None = None

    def bias(self) -> torch.Tensor:
        if self.frozen_bias is not None:
            return self.frozen_bias
        return self.attention_biases[:, self.attention_bias_idxs]

    @torch.no_grad()
    def freeze_bias(self) -> None:
        """Gather the (heads, 49, 49) bias table once, so an export holds it as one constant."""
        self.frozen_bias = self.attention_biases[:, self.attention_bias_idxs].detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, GRID, GRID)
        q, k, v = self.pwconv(x).split([self.nh_kd, self.nh_kd, self.v_dim], dim=1)
        v = v + F.gelu(self.dwconv(v))
        q = q.reshape(b, self.num_heads, self.key_dim, n).transpose(-2, -1)
        k = k.reshape(b, self.num_heads, self.key_dim, n)
        v = v.reshape(b, self.num_heads, self.d_v, n).transpose(-2, -1)
        attn = (q @ k) * self.scale + self.bias()
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.v_dim)
        return self.proj_out(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MAttn(nn.Module):
    """Pre-norm transformer block on tokens: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, mlp_ratio: int):
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SBCFormerBlock(nn.Module):
    """One stage: a local InvRes stream and a pooled 7x7 global stream, fused by a learned gate."""

    FOLD_PAIRS = (("convTrans", "norm"),)

    def __init__(self, dim: int, cfg: SBCFormerConfig, stage: int):
        super().__init__()
        self.pool_ratio = cfg.pool_ratios[stage]
        self.invres_blocks = nn.Sequential()
        for i in range(cfg.depths_invres[stage]):
            self.invres_blocks.add_module(f"InvRes_{i}", InvRes(dim, dim * cfg.invres_ratio))
        if self.pool_ratio > 1:
            self.pool = nn.AvgPool2d(self.pool_ratio, self.pool_ratio)
            self.convTrans = nn.ConvTranspose2d(dim, dim, self.pool_ratio, self.pool_ratio, groups=dim)
            self.norm = nn.BatchNorm2d(dim)
        self.mixer = nn.Sequential()
        for i in range(cfg.depths_mixer[stage]):
            self.mixer.add_module(f"Mixer_{i}", InvRes(dim, dim * 2))
        self.trans_blocks = nn.Sequential()
        for i in range(cfg.depths_mattn[stage]):
            block = MAttn(dim, cfg.key_dim, cfg.num_heads[stage], cfg.attn_ratio, cfg.mlp_ratio)
            self.trans_blocks.add_module(f"MAttn_{i}", block)
        self.proj = Conv2dBN(dim, dim)
        self.gate = nn.Hardsigmoid()  # ReLU6(x + 3) / 6, exported as one HardSigmoid op
        self.proj_fuse = Conv2dBN(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.invres_blocks(x)
        g = self.pool(local) if self.pool_ratio > 1 else local
        g = self.mixer(g)
        b, c, h, w = g.shape
        g = self.trans_blocks(g.flatten(2).transpose(1, 2))
        g = g.transpose(1, 2).reshape(b, c, h, w)
        if self.pool_ratio > 1:
            g = self.norm(self.convTrans(g))
        weight = self.gate(self.proj(g))
        return self.proj_fuse(torch.cat([g, local * weight], dim=1))


class SBCFormer(nn.Module):
    """SBCFormer for 224x224 inputs. `classifier_key` names the head for num_classes detection."""

    classifier_key = "head.weight"

    def __init__(self, cfg: SBCFormerConfig, num_classes: int = 1000):
        super().__init__()
        dims = cfg.embed_dims
        self.num_classes = num_classes
        self.merging_blocks = nn.ModuleList()
        self.sbcformer_blocks = nn.ModuleList()
        # Registration order mirrors the authors' state_dicts: the two (still empty) lists, then the
        # aliases `patch_embed` (the stem) and `sbcformer_blk` (the last stage), then norm and head.
        stem = Stem(dims[0])
        self.merging_blocks.append(stem)
        self.patch_embed = stem
        for stage, dim in enumerate(dims):
            if stage > 0:
                self.merging_blocks.append(PatchMerging(dims[stage - 1], dim))
            self.sbcformer_blocks.append(SBCFormerBlock(dim, cfg, stage))
        self.sbcformer_blk = self.sbcformer_blocks[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for merge, stage in zip(self.merging_blocks, self.sbcformer_blocks, strict=True):
            x = stage(merge(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


def build(variant: str, num_classes: int = 1000) -> SBCFormer:
    return SBCFormer(VARIANTS[variant], num_classes)
