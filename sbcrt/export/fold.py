"""Inference-time folding done in PyTorch before export, so the ONNX graph is already lean on any runtime.

Each model class names its (convolution, BatchNorm) pairs in FOLD_PAIRS; folding scales the convolution's
weights per output channel, gives it the BatchNorm's shift as bias, and turns the BatchNorm into Identity.
"""

from __future__ import annotations

import torch
from torch import nn


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Fold `bn` into `conv` in place (conv gets a bias if it had none)."""
    scale, shift = _bn_scale_shift(bn)
    weight = conv.weight
    if isinstance(conv, nn.ConvTranspose2d):
        # ConvTranspose2d weights are (in, out / groups, kh, kw): output channel o of group g sits at
        # [g * in_per_group + i, o - g * out_per_group].
        groups = conv.groups
        cin, out_per_group = weight.shape[:2]
        w = weight.view(groups, cin // groups, out_per_group, *weight.shape[2:])
        w.mul_(scale.view(groups, 1, out_per_group, 1, 1))
    else:
        weight.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.bias = nn.Parameter(bias * scale + shift)


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every FOLD_PAIRS BatchNorm of `model` into its convolution; returns how many were folded.

    Raises if any BatchNorm is left over, so an export can never silently keep one.
    """
    folded = 0
    for module in model.modules():  # de-duplicated: aliased modules are folded once
        for conv_name, bn_name in getattr(module, "FOLD_PAIRS", ()):
            bn = getattr(module, bn_name, None)
            if isinstance(bn, nn.BatchNorm2d):
                fold_conv_bn(getattr(module, conv_name), bn)
                setattr(module, bn_name, nn.Identity())
                folded += 1
    leftover = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if leftover:
        raise RuntimeError(f"BatchNorm layers without a convolution to fold into: {leftover[:5]}")
    return folded


def freeze_attention_biases(model: nn.Module) -> int:
    """Gather every attention's relative-position bias table once (it becomes one ONNX constant)."""
    frozen = 0
    for module in model.modules():
        if hasattr(module, "freeze_bias"):
            module.freeze_bias()
            frozen += 1
    return frozen


def prepare_for_export(model: nn.Module) -> dict[str, int]:
    """All inference-time folding, in place. The model must already hold its final weights."""
    model.eval()
    return {"batchnorms_folded": fold_batchnorms(model), "attention_tables": freeze_attention_biases(model)}
