"""The device choices `train.training.engine` makes for a run: the autocast dtype and the model's memory format."""

from __future__ import annotations

import pytest
import torch

from train.models import build_model
from train.training import engine

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)])
def test_auto_autocast_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert engine.autocast_dtype(True, "auto", CPU) is expected
    assert engine.autocast_dtype(False, "auto", CPU) is None  # --no-amp: float32 whatever the CPU
    assert engine.autocast_dtype(True, "float16", CPU) is torch.float16  # an explicit dtype is kept
    assert engine.autocast_dtype(True, "auto", CUDA) is torch.float16
    assert engine.autocast_dtype(True, "auto", torch.device("mps")) is None


def test_cpu_without_the_probes_counts_as_no_native_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert engine.cpu_has_native_bf16() is False


def test_prepare_model_is_channels_last_on_cpu_and_computes_the_same():
    torch.manual_seed(0)
    plain = build_model("attention_unet", in_channels=4, out_channels=3, base=8, depth=3, stem=2).eval()
    prepared = build_model("attention_unet", in_channels=4, out_channels=3, base=8, depth=3, stem=2).eval()
    prepared.load_state_dict(plain.state_dict())
    prepared = engine.prepare_model(prepared, CPU)
    convs = [m.weight for m in prepared.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), plain(x), rtol=1e-4, atol=1e-5)
    # its state loads back into a model in the default format, value for value
    again = build_model("attention_unet", in_channels=4, out_channels=3, base=8, depth=3, stem=2)
    again.load_state_dict(prepared.state_dict())
    for (name, a), b in zip(again.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
