"""Seeded checkpoints in the layouts real users have (authors' training script, bare, DDP, timm)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sbcrt.export.random_weights import randomize
from sbcrt.models.registry import get_architecture


def seeded_state_dict(arch: str, seed: int = 0, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    model = randomize(get_architecture(arch).build(num_classes), seed)
    return model.state_dict()


def authors_checkpoint(state_dict: dict[str, torch.Tensor], arch: str) -> dict:
    """The dict the authors' main.py saves (DeiT-style), with an argparse.Namespace under "args"."""
    args = argparse.Namespace(model=arch, input_size=224, batch_size=128, lr=1e-3, epochs=300, data_path="/imagenet")
    return {
        "model": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 299},
        "epoch": 299,
        "args": args,
        "acc": 80.0,
    }


def save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path
