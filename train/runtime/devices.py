"""`--device`: the values `train run`, `evaluate` and `predict` accept and the torch device each names.

    auto     a CUDA GPU when torch sees one, else the CPU (never mps: see below)
    cpu
    cuda     GPU 0; under torchrun, GPU LOCAL_RANK (one GPU per rank)
    cuda:N   GPU N (one process; under torchrun each rank takes GPU LOCAL_RANK: give cuda)
    mps      the GPU of Apple silicon (one process)

`check` validates the spelling without importing torch (config validation, a saved config);
`resolve` asks torch whether the device is there and returns it, or says in one line why not.
`auto` never picks mps: the runs and numbers of this project were measured on CUDA and CPU, and
a user on a Mac asks for mps by name.
"""

from __future__ import annotations

import re
from typing import Any

from shards_spec.errors import ToolError

CHOICES = "auto, cpu, cuda, cuda:N or mps"
_SPELLING = re.compile(r"(auto|cpu|cuda|mps|cuda:(\d+))")


class DeviceError(ToolError):
    """A `--device` that is misspelt or not on this machine; the message starts with `--device:`."""


def check(device: object) -> None:
    """Refuse a value that is none of `CHOICES` (spelling only: no torch, no hardware check)."""
    if not isinstance(device, str) or _SPELLING.fullmatch(device) is None:
        raise DeviceError(f"--device: must be {CHOICES}, got {device!r}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX tiles or AVX512-BF16, e.g. Intel Sapphire
    Rapids, AMD Zen 4): there bf16 autocast about doubles training steps (2301 against 1170 in 10
    minutes, bench/BENCHMARKS.md `quality-bf16`); elsewhere oneDNN emulates bf16, slower than float32."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def defaults_kind(device: str) -> str:
    """Which `config.DEVICE_DEFAULTS` a new run takes: "cuda" for a CUDA GPU (`auto` when torch
    sees one); "cpu" for a CPU that computes bf16 natively (it trains in bf16); "cpu-fp32" for any
    other CPU (it trains in float32: a narrower model makes more steps in the same minutes), also
    for mps (the sizes for a smaller compute budget)."""
    check(device)
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return "cuda"
    elif device.startswith("cuda"):
        return "cuda"
    return "cpu" if cpu_has_native_bf16() else "cpu-fp32"


def resolve(device: str, local_rank: int | None = None) -> Any:
    """The `torch.device` that `device` names on this machine, made the current CUDA device when
    it is one (so that a bare "cuda" anywhere means the same GPU).

    `local_rank` is given under torchrun: `auto` and `cuda` then mean GPU LOCAL_RANK, and a value
    naming one device for every rank (cuda:N, mps) is refused."""
    import torch

    check(device)
    if local_rank is not None and (device == "mps" or device.startswith("cuda:")):
        raise DeviceError(f"--device: {device} names one device for all the processes torchrun starts; "
                          "give cuda (each rank takes GPU LOCAL_RANK) or cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device: mps was asked for, but torch sees no Apple GPU (MPS) "
                              "(use --device cpu or auto)")
        return torch.device("mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError("--device: cuda was asked for, but torch sees no CUDA device (use --device cpu or auto)")
    index = local_rank if local_rank is not None else int(_SPELLING.fullmatch(device).group(2) or 0)  # type: ignore[union-attr]
    if index >= count:
        asked = f"LOCAL_RANK {index} (torchrun)" if local_rank is not None else device
        raise DeviceError(f"--device: {asked}, but torch sees {count} CUDA device(s): "
                          f"{', '.join(f'cuda:{i}' for i in range(count))}")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
