"""Seeded random weights for speed tests and for testing the export without the authors' weights.

Beyond PyTorch's default initialisation, BatchNorm statistics, norm affines and attention biases are made
non-trivial, so that folding them is actually exercised (identity BatchNorms would hide folding bugs).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise `model` deterministically from `seed`, in place; returns it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
                module.reset_parameters()
            elif isinstance(module, nn.BatchNorm2d | nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.num_batches_tracked.fill_(1000)
            for name, param in module.named_parameters(recurse=False):
                if name == "attention_biases":
                    param.normal_(0.0, 0.5)
    return model
