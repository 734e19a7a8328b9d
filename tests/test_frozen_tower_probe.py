"""``benchmarks/frozen_tower_probe.py``: the presence family's per-kind labels come from what the image shows."""

from __future__ import annotations

from tests.tiny import load_benchmark


def test_presence_kind_labels_agree_with_the_presence_answers():
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.data.synth.families import SHAPES
    from visor.data.synth.generate import generate_items

    script = load_benchmark("frozen_tower_probe")
    config = DEFAULT_CONFIG.with_image_size(128)
    images, by_kind = script.presence_kind_labels("test", 40, config)
    assert len(images) == 40 and set(by_kind) == set(SHAPES)
    assert all(len(v) == 40 for v in by_kind.values())
    items = list(generate_items("test", 40, config=config, families=["presence"]))
    for i, item in enumerate(items):
        assert images[i].size == item.image.size
        assert (item.answer == "yes") == by_kind[item.scene["query"]["kind"]][i]
        assert 1 <= sum(by_kind[k][i] for k in SHAPES) <= 3  # 1-3 large shapes
