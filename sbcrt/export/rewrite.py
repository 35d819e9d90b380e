"""Layout-aware rewrites of SBCFormer for onnxruntime on small CPUs: the same math, a faster graph.

Measured on onnxruntime's CPU provider (shared/notes/perf-findings.md, benchmarks/latency.py):
- the global stream's transformer blocks run on the 7x7 map instead of 49 tokens: the MLP and projections become
  1x1 convolutions (faster than Gemm at M=49 on the NCHWc path) and the token<->map reshapes disappear;
- LayerNorm's affine is folded into the projection that follows it (pwconv, fc1, the head);
- the fusion `proj_fuse(concat[G, L * W])` becomes two 1x1 convolutions and an Add (no Concat copy).

`rewrite_for_inference(model)` replaces modules in place, after BatchNorm folding; the export's parity check
compares the result with the untouched PyTorch model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbcrt.models.sbcformer import MAttn, SBCFormer, SBCFormerBlock


def _linear_as_conv(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        conv.bias.copy_(linear.bias)
    return conv


@torch.no_grad()
def _fold_norm_affine(norm: nn.LayerNorm, layer: nn.Conv2d | nn.Linear) -> None:
    """layer(norm(x)) with norm's gamma/beta moved into layer: norm becomes a pure normalisation."""
    weight = layer.weight.view(layer.weight.shape[0], -1)  # (out, in) for 1x1 convs and linears
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(weight.shape[0]))
    layer.bias.add_(weight @ norm.bias)
    weight.mul_(norm.weight)
    norm.weight.fill_(1.0)
    norm.bias.zero_()


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map, without affine (folded into the next layer)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.eps = norm.eps
        self.shape = norm.normalized_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.shape, eps=self.eps)
        return x.permute(0, 3, 1, 2)


class MapMAttn(nn.Module):
    """MAttn on the (B, C, 7, 7) map: the same function as MAttn on the 49 row-major tokens."""

    def __init__(self, block: MAttn):
        super().__init__()
        attn = block.attn
        _fold_norm_affine(block.norm1, attn.pwconv)
        _fold_norm_affine(block.norm2, block.mlp.fc1)
        self.norm1 = ChannelNorm(block.norm1)
        self.norm2 = ChannelNorm(block.norm2)
        self.pwconv, self.dwconv = attn.pwconv, attn.dwconv
        self.proj_out = _linear_as_conv(attn.proj_out)
        self.fc1 = _linear_as_conv(block.mlp.fc1)
        self.fc2 = _linear_as_conv(block.mlp.fc2)
        self.heads, self.key_dim, self.d_v = attn.num_heads, attn.key_dim, attn.d_v
        self.nh_kd, self.v_dim = attn.nh_kd, attn.v_dim
        self.scale = attn.scale
        self.register_buffer("bias", attn.bias().detach().clone())

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        q, k, v = self.pwconv(x).split([self.nh_kd, self.nh_kd, self.v_dim], dim=1)
        v = v + F.gelu(self.dwconv(v))
        q = q.reshape(b, self.heads, self.key_dim, n).transpose(-2, -1)
        k = k.reshape(b, self.heads, self.key_dim, n)
        v = v.reshape(b, self.heads, self.d_v, n)
        scores = q @ k
        if self.scale != 1.0:  # decided while tracing: no Mul node once fold_attention_scale has run
            scores = scores * self.scale
        attn = (scores + self.bias).softmax(dim=-1)
        out = (v @ attn.transpose(-2, -1)).reshape(b, self.v_dim, h, w)  # (attn v)^T: channels stay first
        return self.proj_out(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FastBlock(nn.Module):
    """SBCFormerBlock with the global stream kept on the map and the fusion concat split in two convs."""

    def __init__(self, block: SBCFormerBlock):
        super().__init__()
        self.invres_blocks, self.mixer = block.invres_blocks, block.mixer
        self.pool_ratio = block.pool_ratio
        if self.pool_ratio > 1:
            self.pool, self.convTrans = block.pool, block.convTrans  # BatchNorm already folded into convTrans
        self.trans_blocks = nn.Sequential(*(MapMAttn(b) for b in block.trans_blocks))
        self.proj, self.gate = block.proj, block.gate
        fuse = block.proj_fuse.conv  # (C, 2C, 1, 1) with the folded BatchNorm as bias
        dim = fuse.weight.shape[0]
        self.fuse_global = nn.Conv2d(dim, dim, 1)
        self.fuse_local = nn.Conv2d(dim, dim, 1, bias=False)
        with torch.no_grad():
            self.fuse_global.weight.copy_(fuse.weight[:, :dim])
            self.fuse_global.bias.copy_(fuse.bias)
            self.fuse_local.weight.copy_(fuse.weight[:, dim:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.invres_blocks(x)
        g = self.pool(local) if self.pool_ratio > 1 else local
        g = self.trans_blocks(self.mixer(g))
        if self.pool_ratio > 1:
            g = self.convTrans(g)
        weight = self.gate(self.proj(g))
        return self.fuse_global(g) + self.fuse_local(local * weight)


class FastSBCFormer(nn.Module):
    def __init__(self, model: SBCFormer):
        super().__init__()
        self.num_classes = model.num_classes
        self.merging_blocks = model.merging_blocks
        self.blocks = nn.ModuleList(FastBlock(b) for b in model.sbcformer_blocks)
        _fold_norm_affine(model.norm, model.head)
        self.norm_eps, self.norm_shape = model.norm.eps, model.norm.normalized_shape
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for merge, block in zip(self.merging_blocks, self.blocks, strict=True):
            x = block(merge(x))
        x = F.layer_norm(x.mean(dim=(2, 3)), self.norm_shape, eps=self.norm_eps)
        return self.head(x)


@torch.no_grad()
def fold_attention_scale(model: nn.Module) -> nn.Module:
    """(q @ k) * scale with the scale moved into the rows of the projection that makes q: the same function, one
    elementwise multiply of every attention map less. For the ncnn graph (sbcrt/export/ncnn_export.py), where it
    is a layer of its own (measured: 102 K instructions of SBCFormer-XS's 182 M on a Cortex-A72); the ONNX graph
    keeps it, as onnxruntime's counts and timings were measured. In place; returns `model`."""
    for module in model.modules():
        if isinstance(module, MapMAttn) and module.scale != 1.0:
            rows = slice(0, module.nh_kd)  # pwconv's output is [q, k, v] along the channels
            module.pwconv.weight[rows] *= module.scale
            module.pwconv.bias[rows] *= module.scale
            module.scale = 1.0
    return model


def rewrite_for_inference(model: nn.Module) -> nn.Module:
    """The fastest equivalent form for export (SBCFormer only; other models are returned unchanged)."""
    if isinstance(model, SBCFormer):
        return FastSBCFormer(model)
    return model
