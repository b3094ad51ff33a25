"""The papers' training-time blocks: each collapses to one conv per block, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxfuse.zoo import (
    ACBlock,
    CSLABlock,
    DilatedReparam,
    MobileOneBlock,
    RepVGGBlock,
    RepViTMixer,
    repvgg_net,
)
from tests.helpers import fuse_and_check, identity_branches


@pytest.mark.parametrize(
    ("cin", "cout", "stride", "groups"),
    [(8, 8, 1, 1), (8, 8, 1, 4), (4, 8, 2, 1), (8, 8, 2, 2), (8, 16, 1, 2)],
)
def test_repvgg_block(cin: int, cout: int, stride: int, groups: int) -> None:
    block = RepVGGBlock(cin, cout, stride, groups)
    fused, before, _after = fuse_and_check(block, torch.randn(2, cin, 9, 9), convs=1)
    assert before["conv"] == 2
    identities = identity_branches(fused)
    assert identities == (1 if block.identity is not None else 0)


@pytest.mark.parametrize(("k", "padding"), [(3, 1), (3, 2), (3, 0), (5, 2), (5, 3), (5, 0), (5, 1)])
def test_acnet_block(k: int, padding: int) -> None:
    _fused, before, _ = fuse_and_check(
        ACBlock(4, 6, k, padding), torch.randn(2, 4, 11, 11), convs=1
    )
    assert before["conv"] == 3


def test_acnet_block_strided() -> None:
    for size in (10, 11):
        fuse_and_check(ACBlock(4, 6, 3, 1, stride=2), torch.randn(1, 4, size, size), convs=1)


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "groups"),
    [(8, 8, 3, 1, 8), (8, 8, 3, 2, 8), (8, 16, 1, 1, 1), (8, 8, 1, 1, 1), (4, 8, 3, 1, 1)],
    ids=["depthwise", "depthwise-s2", "pointwise-expand", "pointwise-skip", "dense"],
)
def test_mobileone_block(cin: int, cout: int, kernel: int, stride: int, groups: int) -> None:
    block = MobileOneBlock(cin, cout, kernel, stride, groups, branches=4)
    _, before, _ = fuse_and_check(block, torch.randn(2, cin, 8, 8), convs=1)
    assert before["conv"] >= 4


def test_csla_block_without_batch_norm() -> None:
    fuse_and_check(CSLABlock(6), torch.randn(2, 6, 7, 7), convs=1, batch_norms=0)


def test_repvit_mixer_with_batch_norm_after_the_sum() -> None:
    _fused, before, _ = fuse_and_check(RepViTMixer(8), torch.randn(2, 8, 7, 7), convs=1)
    assert before["batch_norm"] == 2


def test_dilated_reparam_block() -> None:
    fuse_and_check(DilatedReparam(4), torch.randn(2, 4, 12, 12), convs=1)


def test_whole_network_is_one_conv_per_block() -> None:
    net = repvgg_net()
    fused, before, after = fuse_and_check(net, torch.randn(2, 3, 32, 32), convs=5)
    assert before["conv"] == 10 and after["batch_norm"] == 0
    assert not fused.fxfuse_report.declines


def test_float64_network_is_exact_to_1e_10() -> None:
    fuse_and_check(repvgg_net().double(), torch.randn(2, 3, 17, 17, dtype=torch.float64), convs=5)


def test_mobileone_network_with_huge_activations() -> None:
    # Random MobileOne outputs reach enormous magnitudes (docs/design.md trap 5): the normalised
    # error is the right measure.
    net = nn.Sequential(*[MobileOneBlock(8, 8, 3, 1, 1, branches=4) for _ in range(6)])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(4)
    fuse_and_check(net, torch.randn(1, 8, 8, 8), convs=6)
