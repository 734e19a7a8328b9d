"""The router: per-sample choice of the active configuration.

Design (DESIGN.md section 2, "Router input"):
* learned routing token(s) are appended after the prompt (positions right after its last token) and run
  through the layers before the first optional SA slot; those layers are text-only or cross-attention
  whatever the configuration, so their result does not depend on the choice being made;
* the routing tokens' states after that layer go through a small MLP (RMSNorm -> Linear -> GELU ->
  Linear) giving one logit per viable configuration;
* the decision is made in its own short pass, and the prompt is then run with the chosen configuration
  as if it had been fixed: the routing tokens are never in the KV cache nor seen by later layers, so
  routed output equals the fixed configuration's output exactly. The price is running the layers before
  the first slot twice on the prompt's text (and the CA blocks among them); the cost model counts it
  (``RouterGeometry``) and ``visor route report`` shows it.
* ``read_after_layer`` (default: the layer before the first SA slot) may also be deeper: the routing pass
  then runs the CA-only configuration up to there, SA slots skipped, and the cost model counts those layers.
  Routed output still equals the fixed configuration's (the pass stays separate).
* ``budget``: ``logits - budget * cost(config) / cost(maximal)`` before the argmax (0 = as trained,
  > 0 cheaper, < 0 richer), with costs from the analytic model at the sample's own token counts.
* ``objective`` (``model.config.router["objective"]``): ``"label"`` (the paper's; default) trains the MLP with
  cross-entropy on the pseudo-label, the cheapest configuration within the threshold. ``"score"`` trains one
  output per configuration to predict the sample's score under it (binary cross-entropy on the stored
  per-configuration scores), and routing compares the predicted scores: ``sigmoid(logits) - budget * cost /
  cost(maximal)``. The budget is then in score units: 0.01 = give up one point of predicted accuracy per
  maximal configuration's worth of compute. A label router's argmax follows the most common label, which for
  most items is the cheapest configuration whatever it adds; a score router weighs what each configuration adds.
  On the shipped model it does not beat the label router (``docs/training-log.md``, "8,000 labels, 2,000
  validation items, and a router that predicts scores").
* resolution on request (``visor.model.resolution``, ``visor.routing.resolution``): a router whose
  configurations name a resolution reads the *base-only* layout (no tile encoded yet) and picks both parts;
  its costs are end to end (vision tower + LLM).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from visor.model.layers import RMSNorm


class Router(nn.Module):
    """Routing tokens + MLP over the viable configurations."""

    def __init__(self, hidden_size: int, num_configs: int, num_tokens: int = 1, mlp_hidden: int = 256, eps: float = 1e-6) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_tokens, hidden_size) * 0.02)
        self.norm = RMSNorm(hidden_size, eps)
        self.mlp = nn.Sequential(nn.Linear(num_tokens * hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, num_configs))

    def forward(self, token_states: torch.Tensor) -> torch.Tensor:
        """[B, num_tokens, D] routing-token states -> [B, num_configs] logits."""
        return self.mlp(self.norm(token_states).flatten(1).float().to(self.mlp[0].weight.dtype))


def router_settings(model) -> dict:
    settings = model.config.router
    if not settings:
        raise ValueError("this model has no router: train one with `visor route train`")
    return settings


OBJECTIVES = ("label", "score")


def attach_router(model, configs: Sequence, num_tokens: int = 1, mlp_hidden: int = 256,
                  read_after_layer: int | None = None, objective: str = "label") -> Router:
    """Add a fresh router over ``configs`` to ``model`` (recorded in ``model.config.router``).

    ``configs``: SA slot lists, or configurations with a resolution (``visor.model.resolution``);
    ``objective``: ``"label"`` or ``"score"`` (module docstring)."""
    from visor.model.resolution import names_resolution, parse_configuration

    plan = model.plan
    if not plan.self_attention_layers:
        raise ValueError("the plan has no optional SA slot: there is nothing to route")
    first_slot_layer = min(plan.self_attention_layers)
    # default: the paper's position, the layer before the first SA slot. The routing pass is its own CA-only run
    # (routing_logits), so a router may also read deeper, after more cross-attention layers, at the cost of those
    # layers in the pass (router_overhead_flops)
    read = first_slot_layer - 1 if read_after_layer is None else int(read_after_layer)
    with_resolution = names_resolution(configs)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "score" and with_resolution:
        raise ValueError("a score router chooses SA configurations only; a resolution router uses objective='label'")
    if not 0 <= read < plan.num_layers:
        raise ValueError(f"read_after_layer must be in 0..{plan.num_layers - 1}, got {read}")
    if with_resolution:
        configs = [parse_configuration(c, plan).to_json() for c in configs]
    else:
        configs = [list(plan.resolve_active(c)) for c in configs]
    if len(configs) < 2:
        raise ValueError("a router needs at least two configurations to choose from")
    text = model.config.text_config
    router = Router(text.hidden_size, len(configs), num_tokens, mlp_hidden, text.rms_norm_eps)
    model.router = router.to(next(model.parameters()).device)
    model.config.router = {"configs": configs, "num_tokens": num_tokens, "mlp_hidden": mlp_hidden, "read_after_layer": read,
                           "objective": objective}
    return router


def router_objective(model) -> str:
    """``"label"`` or ``"score"`` (module docstring); routers saved before the choice existed are label routers."""
    return router_settings(model).get("objective", "label")


def build_router(config) -> Router | None:
    """The router module a config describes (``None`` without one); used by the model's constructor."""
    settings = config.router
    if not settings:
        return None
    text = config.text_config
    return Router(text.hidden_size, len(settings["configs"]), settings.get("num_tokens", 1),
                  settings.get("mlp_hidden", 256), text.rms_norm_eps)


def routing_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images_per_sample: list,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Router logits per sample ([B, num_configs]) from the short routing pass (module docstring);
    ``position_ids`` default to ``cumsum(attention_mask) - 1`` (a selector's original positions otherwise)."""
    from visor.model.plan import LayerKind

    settings = router_settings(model)
    read = int(settings["read_after_layer"])
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    streams = model.build_streams(input_ids, attention_mask, position_ids, images_per_sample)
    router = model.router
    k = router.tokens.shape[0]
    batch = input_ids.shape[0]
    tokens = router.tokens.to(streams.text.dtype)[None].expand(batch, -1, -1)
    last = position_ids.max(dim=1).values
    streams.text = torch.cat([streams.text, tokens], dim=1)
    streams.text_pos = torch.cat([streams.text_pos, last[:, None] + 1 + torch.arange(k, device=last.device)[None]], dim=1)
    streams.text_valid = torch.cat([streams.text_valid, torch.ones(batch, k, dtype=torch.bool, device=last.device)], dim=1)
    kinds = model.plan.layer_kinds(())
    if any(kind is LayerKind.SELF_ATTENTION for kind in kinds[: read + 1]):
        raise ValueError("the routing layers must not contain a self-attention layer")
    model.language_model.run_layers(streams, kinds, 0, read + 1, None)
    return router(streams.text[:, -k:])


def routes_resolution(model) -> bool:
    """Whether the model's router also picks the resolution (``visor.model.resolution``)."""
    from visor.model.resolution import names_resolution

    settings = getattr(model.config, "router", None)
    return bool(settings) and names_resolution(settings["configs"])


def router_configurations(model) -> list:
    """The router's configurations as ``visor.model.resolution.Configuration``s (full unless named)."""
    from visor.model.resolution import parse_configuration

    return [parse_configuration(c, model.plan) for c in router_settings(model)["configs"]]


def relative_costs(model, n_visual: Sequence[int], n_text: Sequence[int]) -> torch.Tensor:
    """[B, num_configs] LLM prefill FLOPs of each router configuration / the most expensive one."""
    from visor.cost import Geometry, count_prefill

    configs = [tuple(c) for c in router_settings(model)["configs"]]
    geometry = Geometry.from_config(model.config)
    rows = []
    for nv, nt in zip(n_visual, n_text):
        if int(nv) <= 0:  # text only: every configuration costs the same
            rows.append([1.0] * len(configs))
            continue
        flops = [count_prefill(geometry, model.plan, c, int(nv), max(int(nt), 1)).llm_total for c in configs]
        top = max(flops)
        rows.append([f / top for f in flops])
    return torch.tensor(rows, dtype=torch.float32)


@torch.no_grad()
def route(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None, image_sizes=None,
          batch_num_images=None, image_features=None, budget: float = 0.0, image_tiled=None,
          position_ids: torch.Tensor | None = None) -> list:
    """The configuration the router picks for each sample (``budget`` biases towards cheaper ones).

    SA slot tuples; for a router that also picks the resolution, ``Configuration``s, read from base-only
    inputs (``visor.routing.resolution.route_on_request``). ``position_ids``: explicit positions of the prompt
    (a pre-LLM selector's original ones, ``visor.compression.apply``); not for a resolution router."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if routes_resolution(model):
        from visor.routing.resolution import route_on_request

        if position_ids is not None:
            raise ValueError("a resolution router builds its own base-view prompt: explicit position_ids do not apply")
        return route_on_request(model, input_ids, attention_mask, pixel_values, image_sizes, batch_num_images,
                                image_features, budget, image_tiled)
    if image_features is None and pixel_values is not None:
        image_features = model.encode_images(pixel_values, image_sizes, batch_num_images, image_tiled)
    per_sample = model._assign_images(image_features or [], input_ids.shape[0], batch_num_images)
    logits = routing_logits(model, input_ids, attention_mask, per_sample, position_ids).float()
    if router_objective(model) == "score":  # predicted score per configuration, the unit the budget is in
        logits = torch.sigmoid(logits)
    if budget:
        mask = attention_mask.bool()
        n_visual = ((input_ids == model.config.image_token_id) & mask).sum(1)
        n_text = mask.sum(1) - n_visual
        logits = logits - float(budget) * relative_costs(model, n_visual.tolist(), n_text.tolist()).to(logits.device)
    configs = [tuple(c) for c in router_settings(model)["configs"]]
    return [configs[int(i)] for i in logits.argmax(-1)]


def router_overhead_flops(model, n_visual: int, n_text: int) -> int:
    """FLOPs the routing pass adds to a routed sample's prefill.

    Counted as implemented: the layers up to ``read_after_layer`` run a second time on the prompt's text
    plus the routing tokens (including their CA blocks, whose visual K/V projections are recomputed),
    then the MLP. A design that reused this prefix in the main pass would save it.
    """
    from visor.cost import Geometry, count_prefill

    settings = router_settings(model)
    read, k = int(settings["read_after_layer"]), int(settings.get("num_tokens", 1))
    geometry = Geometry.from_config(model.config)
    prefix = count_prefill(geometry, model.plan, (), max(int(n_visual), 1), int(n_text) + k).per_layer[: read + 1]
    if int(n_visual) <= 0:  # no image: the CA blocks are skipped; count the text layers only
        prefix = count_prefill(geometry, model.plan, (), 1, int(n_text) + k).per_layer[: read + 1]
    hidden = model.config.text_config.hidden_size
    mlp_hidden = int(settings.get("mlp_hidden", 256))
    mlp = 2 * (k * hidden * mlp_hidden + mlp_hidden * len(settings["configs"]))
    return int(sum(prefix) + mlp)
