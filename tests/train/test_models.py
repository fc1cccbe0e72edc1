"""Models: output shape, parameter count against a hand formula, gradients, input validation."""

from __future__ import annotations

import pytest
import torch

from train.models import MODELS, AttentionUNet, UNet, build_model, count_parameters

torch.set_num_threads(1)


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def double_conv(c_in: int, c_out: int, bn: bool) -> int:
    # two 3x3 convs; with BN the conv has no bias and BN has weight + bias per channel
    extra = 2 * c_out if bn else 0
    return conv(c_in, c_out, 3, not bn) + extra + conv(c_out, c_out, 3, not bn) + extra


def expected_unet(c_in: int, c_out: int, base: int, depth: int, bn: bool) -> int:
    w = [base * 2**i for i in range(depth + 1)]
    total = double_conv(c_in, w[0], bn)
    total += sum(double_conv(w[i - 1], w[i], bn) for i in range(1, depth + 1))  # incl. bottleneck
    total += sum(conv(w[i + 1], w[i], 2) for i in range(depth))  # transposed convs (same count)
    total += sum(double_conv(2 * w[i], w[i], bn) for i in range(depth))
    return total + conv(w[0], c_out, 1)


def expected_gates(base: int, depth: int, bn: bool) -> int:
    total = 0
    for i in range(depth):
        c = base * 2**i
        f = max(1, c // 2)
        norm = 2 if bn else 0
        # W_g and W_x: 1x1 c -> f (+BN), psi: 1x1 f -> 1 (+BN)
        total += 2 * (conv(c, f, 1, not bn) + norm * f) + conv(f, 1, 1, not bn) + norm
    return total


def test_parameter_count_by_hand_small_config():
    # base 4, depth 2, in 2, out 3, BN, written out term by term:
    enc = (2 * 4 * 9 + 8) + (4 * 4 * 9 + 8) + (4 * 8 * 9 + 16) + (8 * 8 * 9 + 16)
    bottleneck = (8 * 16 * 9 + 32) + (16 * 16 * 9 + 32)
    ups = (16 * 8 * 4 + 8) + (8 * 4 * 4 + 4)
    dec = (16 * 8 * 9 + 16) + (8 * 8 * 9 + 16) + (8 * 4 * 9 + 8) + (4 * 4 * 9 + 8)
    head = 4 * 3 + 3
    assert count_parameters(UNet(2, 3, base=4, depth=2)) == enc + bottleneck + ups + dec + head
    gates = (2 * (8 * 4 + 8) + (4 + 2)) + (2 * (4 * 2 + 4) + (2 + 2))
    total = enc + bottleneck + ups + dec + head + gates
    assert count_parameters(AttentionUNet(2, 3, base=4, depth=2)) == total


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("c_in,base,depth", [(2, 4, 2), (4, 8, 3), (1, 2, 1), (4, 32, 4)])
def test_parameter_count_formula(c_in, base, depth, bn):
    unet = expected_unet(c_in, 3, base, depth, bn)
    assert count_parameters(UNet(c_in, 3, base, depth, bn)) == unet
    gated = unet + expected_gates(base, depth, bn)
    assert count_parameters(AttentionUNet(c_in, 3, base, depth, bn)) == gated


def test_documented_default_counts():
    assert count_parameters(build_model("unet", 2)) == 7_762_819
    assert count_parameters(build_model("attention_unet", 4)) == 7_851_643


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_shape_and_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=4, base=4, depth=3)
    x = torch.randn(2, 4, 16, 24)
    out = model(x)
    assert out.shape == (2, 3, 16, 24)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # the first and the gating layers receive signal, not just the head
    assert model.encoder[0][0].weight.grad.abs().sum() > 0
    if name == "attention_unet":
        assert all(g.psi[0].weight.grad.abs().sum() > 0 for g in model.gates)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_mode_and_no_batch_norm(name):
    model = build_model(name, in_channels=2, base=4, depth=2, batch_norm=False).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rejects_indivisible_input(name):
    model = build_model(name, in_channels=2, base=4, depth=3)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 8"):
        model(torch.randn(1, 2, 16, 20))


def test_registry_errors():
    with pytest.raises(ValueError, match="choose one of \\['attention_unet', 'unet'\\]"):
        build_model("resnet", 2)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        build_model("unet", 2, depth=0)


def test_attention_gate_is_a_multiplicative_mask():
    model = AttentionUNet(2, base=4, depth=2).eval()
    skip, up = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    gated = model.gates[-1](skip, up)
    ratio = gated / skip
    assert ((ratio > 0) & (ratio < 1)).all()  # sigmoid weights in (0, 1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)  # one map for all channels


@pytest.mark.parametrize("cls", [UNet, AttentionUNet])
def test_stem_halves_every_level_and_adds_exactly_its_two_layers(cls):
    plain, stemmed = cls(4, 3, base=8, depth=2), cls(4, 3, base=8, depth=2, stem=2)
    # the stem: a 3x3 conv 4 -> 8 without bias + BN(8); the encoder's first conv then takes 8 channels,
    # not 4; the un-stem: a 2x2 transposed conv 8 -> 8 with bias
    stem = conv(4, 8, 3, False) + 2 * 8
    first_conv_change = conv(8, 8, 3, False) - conv(4, 8, 3, False)
    unstem = conv(8, 8, 2)
    assert count_parameters(stemmed) == count_parameters(plain) + stem + first_conv_change + unstem
    x = torch.randn(2, 4, 32, 32)
    assert stemmed(x).shape == (2, 3, 32, 32)
    feature_sizes = []
    stemmed.encoder[0].register_forward_hook(lambda m, i, o: feature_sizes.append(o.shape[-1]))
    stemmed(x)
    assert feature_sizes == [16]  # the first level works at half resolution
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 8"):
        stemmed(torch.randn(1, 4, 20, 20))  # 20 is divisible by 4 = 2**depth but not by 8
    with pytest.raises(ValueError, match="stem must be 1"):
        cls(4, 3, stem=3)


def test_deep_supervision_adds_outputs_in_training_only_and_weights_their_losses():
    from train.recipe.losses import deep_supervision_loss

    model = AttentionUNet(4, 3, base=4, depth=3, deep_supervision=True)
    x = torch.randn(2, 4, 32, 32)
    out, half, quarter = model.train()(x)
    assert out.shape == (2, 3, 32, 32) and half.shape == (2, 3, 16, 16) and quarter.shape == (2, 3, 8, 8)
    assert model.eval()(x).shape == (2, 3, 32, 32)  # inference sees one output
    plain = AttentionUNet(4, 3, base=4, depth=3)
    assert count_parameters(model) == count_parameters(plain) + conv(8, 3, 1) + conv(16, 3, 1)
    # the loss: 4:2:1 over the outputs, each against the target downsampled by nearest neighbour
    target = (torch.rand(2, 3, 32, 32) > 0.5).float()
    seen = []

    def record(logits, t):
        seen.append((tuple(logits.shape), t[0, 0].clone()))
        return torch.tensor(float(len(seen)))  # 1, 2, 3: easy to weigh by hand

    value = deep_supervision_loss(record, (out, half, quarter), target)
    assert value.item() == pytest.approx((4 * 1 + 2 * 2 + 1 * 3) / 7)
    assert [s for s, _ in seen] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    # nearest-exact at a factor of 2 takes the pixel at floor((i + 0.5) * 2) = 2i + 1 (the shards' label rule)
    assert torch.equal(seen[1][1], target[0, 0, 1::2, 1::2])
