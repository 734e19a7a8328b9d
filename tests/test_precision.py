"""visor.precision: ``auto`` follows the hardware's bf16 speed; explicit precisions pass through."""

from __future__ import annotations

import pytest
import torch

from visor import precision


@pytest.mark.parametrize("amx, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_where_the_cpu_has_amx(monkeypatch, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert precision.fast_bf16("cpu") is amx
    assert precision.resolve_precision("auto") == expected
    assert precision.resolve_precision("bf16") == "bf16" and precision.resolve_precision("fp32") == "fp32"


def test_without_the_probe_auto_falls_back_to_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert precision.resolve_precision("auto") == "fp32"


def test_autocast_switches_cpu_bf16_autocast(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    with precision.autocast("bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    for name in ("fp32", "auto"):  # auto is fp32 without AMX
        with precision.autocast(name):
            assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        precision.resolve_precision("fp16")
