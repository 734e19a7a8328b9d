"""``VisorConfig``: a LLaVA-OneVision config plus the VISOR layer plan and block options.

It subclasses ``transformers.LlavaOnevisionConfig`` so every LLaVA-OV field (vision/text sub-configs,
grid pinpoints, feature layer, image token id, ...) keeps its meaning and defaults; ``model_type`` is
``"visor"`` so the Auto classes resolve to our model.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlavaOnevisionConfig

from visor.model.plan import LayerPlan


@strict
class VisorConfig(LlavaOnevisionConfig):
    r"""
    cross_attention_layers (`list[int]`, *optional*):
        Decoder layers carrying a cross-attention block. ``None`` with ``self_attention_layers=None``
        means the DESIGN.md default plan (``LayerPlan.default``).
    self_attention_layers (`list[int]`, *optional*):
        Decoder layers that are optional self-attention slots, in layer order (slot j = j-th entry).
    slot_order (`list[int]`, *optional*):
        Order in which ``sa_count=K`` switches slots on (written by the viable-configuration search).
    ca_kv_layout (`str`, defaults to ``"gqa"``):
        ``"gqa"``: cross-attention keys/values use the LLM's KV-head count; ``"full"``: one per query head.
    ca_conv_kernel (`int`, defaults to 7):
        Kernel of the depthwise conv giving visual tokens positional information in CA layers.
    viable_configs (`list[list[int]]`, *optional*):
        Active SA configurations the universal model was trained for (cheapest first).
    router (`dict`, *optional*):
        Router settings (see ``visor.routing``), present once a router is attached.
    """

    model_type = "visor"

    cross_attention_layers: list[int] | None = None
    self_attention_layers: list[int] | None = None
    slot_order: list[int] | None = None
    ca_kv_layout: str = "gqa"
    ca_conv_kernel: int = 7
    viable_configs: list | None = None
    router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.cross_attention_layers is None and self.self_attention_layers is None:
            plan = LayerPlan.default(self.text_config.num_hidden_layers)
            self.cross_attention_layers = list(plan.cross_attention_layers)
            self.self_attention_layers = list(plan.self_attention_layers)
        self.cross_attention_layers = list(self.cross_attention_layers or [])
        self.self_attention_layers = list(self.self_attention_layers or [])
        self.layer_plan  # validate now: a bad plan fails at construction, not inside forward
        if self.ca_kv_layout not in ("gqa", "full"):
            raise ValueError(f"ca_kv_layout must be 'gqa' or 'full', got {self.ca_kv_layout!r}")

    @property
    def layer_plan(self) -> LayerPlan:
        return LayerPlan(
            num_layers=self.text_config.num_hidden_layers,
            cross_attention_layers=tuple(self.cross_attention_layers),
            self_attention_layers=tuple(self.self_attention_layers),
            slot_order=tuple(self.slot_order) if self.slot_order is not None else None,
        )

    def set_plan(self, plan: LayerPlan) -> None:
        if plan.num_layers != self.text_config.num_hidden_layers:
            raise ValueError(
                f"the plan is for {plan.num_layers} layers but the checkpoint's LLM has "
                f"{self.text_config.num_hidden_layers} layers"
            )
        self.cross_attention_layers = list(plan.cross_attention_layers)
        self.self_attention_layers = list(plan.self_attention_layers)
        self.slot_order = list(plan.slot_order)


# Here rather than beside the model: loading a checkpoint's tokenizer resolves its config.json through AutoConfig,
# and a config-only import must be enough for that (visor.data.tokenizer.load_tokenizer).
AutoConfig.register("visor", VisorConfig, exist_ok=True)
