"""The PyTorch definitions against the spec: checkpoint keys, sizes, attention details, real accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sbcrt.export.fold import fold_conv_bn, prepare_for_export
from sbcrt.export.random_weights import randomize
from sbcrt.export.rewrite import rewrite_for_inference
from sbcrt.models.registry import ARCHITECTURES, get_architecture
from sbcrt.models.sbcformer import Attention, attention_bias_indices

KEY_FILES = {
    "sbcformer_xs": "SBCFormer_XS",
    "sbcformer_s": "SBCFormer_S",
    "sbcformer_b": "SBCFormer_B",
    "sbcformer_l": "SBCFormer_L",
    "efficientnet_lite0": "efficientnet_lite0",
}
PAPER_PARAMS_M = {"sbcformer_xs": 5.59, "sbcformer_s": 8.47, "sbcformer_b": 13.83, "sbcformer_l": 18.51}


@pytest.mark.parametrize("arch", list(KEY_FILES))
def test_state_dict_matches_the_checkpoint_keys_in_order(arch: str, shared_dir: Path) -> None:
    listed = json.loads((shared_dir / "spec" / f"{KEY_FILES[arch]}.keys.json").read_text())["keys"]
    mine = [
        [k, list(v.shape), str(v.dtype).removeprefix("torch.")]
        for k, v in get_architecture(arch).build(1000).state_dict().items()
    ]
    assert mine == listed


@pytest.mark.parametrize("arch", list(PAPER_PARAMS_M))
def test_parameter_count_matches_the_paper(arch: str) -> None:
    model = get_architecture(arch).build(1000)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(PAPER_PARAMS_M[arch], abs=0.006)


def test_aliased_modules_are_shared_like_the_authors() -> None:
    model = get_architecture("sbcformer_xs").build(1000)
    assert model.patch_embed is model.merging_blocks[0]
    assert model.sbcformer_blk is model.sbcformer_blocks[-1]


def test_attention_bias_indices_number_offsets_by_first_appearance() -> None:
    idxs = attention_bias_indices(7)
    assert idxs.shape == (49, 49)
    assert int(idxs.max()) + 1 == 49  # (|dr|, |dc|) with both in 0..6
    assert idxs[0, :7].tolist() == list(range(7))  # point 0 against row 0: offsets (0,0)..(0,6)
    assert idxs[0, 7].item() == 7  # (1, 0) is the next new offset
    assert torch.equal(idxs, idxs.T)  # |offset| is symmetric
    assert torch.all(idxs.diagonal() == 0)


def test_attention_bias_comes_from_loaded_weights_even_after_eval() -> None:
    # The authors' code caches the table on .eval(); loading weights afterwards must still take effect.
    attn = Attention(dim=32, key_dim=8, num_heads=2, attn_ratio=2).eval()
    x = torch.randn(1, 49, 32)
    before = attn(x)
    with torch.no_grad():
        attn.attention_biases.normal_()
    assert not torch.allclose(attn(x), before)
    attn.freeze_bias()
    assert torch.equal(attn.frozen_bias, attn.attention_biases[:, attn.attention_bias_idxs])


@pytest.mark.parametrize("groups", [1, 4])
def test_fold_conv_bn_matches_conv_then_bn(groups: int) -> None:
    torch.manual_seed(0)
    for conv in (
        nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False),
        nn.ConvTranspose2d(8, 8, 2, 2, groups=groups),
    ):
        bn = nn.BatchNorm2d(8)
        randomize(nn.Sequential(conv, bn), seed=3)
        x = torch.randn(2, 8, 7, 7)
        with torch.no_grad():
            expected = bn.eval()(conv(x))
            fold_conv_bn(conv, bn)
            assert torch.allclose(conv(x), expected, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_folded_and_rewritten_models_equal_the_original(arch: str) -> None:
    model = randomize(get_architecture(arch).build(1000), seed=1)
    prepared = randomize(get_architecture(arch).build(1000), seed=1)
    counts = prepare_for_export(prepared)
    assert counts["batchnorms_folded"] > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, folded = model(x), prepared(x)
        rewritten = rewrite_for_inference(prepared)(x)
    assert (folded - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (rewritten - ref).abs().max() <= 1e-5 * ref.abs().max()
