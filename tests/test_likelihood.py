"""Teacher-forced answer likelihood (``visor.eval.likelihood``): inputs follow the model's device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from visor.eval.likelihood import answer_probabilities


class _Seen(Exception):
    pass


class _DeviceProbe(torch.nn.Module):
    """A model on the ``meta`` device that records where its inputs are, then stops the scorer."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.devices: dict[str, torch.device] = {}

    def forward(self, active_sa=None, **batch):
        self.devices = {k: v.device for k, v in batch.items() if torch.is_tensor(v)}
        raise _Seen


class _CpuBatcher:
    def train_batch(self, samples, **kwargs):
        n = len(samples)
        return {"input_ids": torch.zeros(n, 4, dtype=torch.long), "labels": torch.zeros(n, 4, dtype=torch.long),
                "pixel_values": torch.zeros(n, 3, 8, 8), "note": "left alone"}


def test_answer_probabilities_moves_the_batch_to_the_models_device():
    # a GPU training run crashed at its first evaluation: the batcher builds on the CPU, the model was on CUDA
    item = SimpleNamespace(images=[], turns=[{"from": "human", "value": "q"}], answers=["a"])
    model = _DeviceProbe()
    with pytest.raises(_Seen):
        answer_probabilities(model, _CpuBatcher(), [item], config=())
    assert set(model.devices) == {"input_ids", "labels", "pixel_values"}
    assert all(device.type == "meta" for device in model.devices.values())
