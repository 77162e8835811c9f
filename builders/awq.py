"""Activation-aware weight scaling (AWQ) for the int4 ONNX graph, folded exactly into the HF weights.

4-bit blocks lose most on the input channels that carry large activations. AWQ scales those weight columns up by
s = mean|x|^alpha (and the activations down by 1/s) before round-to-nearest quantization, choosing alpha per
projection by the output error on calibration activations. The 1/s is folded into the op before each projection,
so the graph and the fp32 function stay the same. A norm that multiplies by (1 + weight) (Gemma) gets
weight = (1 + weight) / s - 1.

- q/k/v (input: the attention RMSNorm)    -> input_layernorm.weight / s
- gate/up (input: the MLP RMSNorm)        -> post_attention_layernorm.weight / s (Gemma 3: pre_feedforward_layernorm)
- o_proj (input: attention output, a mix of v rows) -> v_proj rows / s (s shared by the query heads of a kv head)
- down_proj (input: silu(gate) * up)      -> up_proj rows / s

Calibration prompts come from builders/data/calibration_prompts.jsonl (or `--calib`), never from the held-out text
the gate scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .architecture import architecture_of

ALPHAS = tuple(i / 8 for i in range(9))
SAMPLE_ROWS = 128  # activation rows kept per projection to measure output error


def fake_quantize_4bit(weight_t: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric 4-bit round-to-nearest in blocks of `block` input channels, as MatMulNBits stores it.

    `weight_t` is [in, out] (the graph's MatMul layout); blocks run along `in`.
    """
    inputs, outputs = weight_t.shape
    blocks = weight_t.T.reshape(outputs, inputs // block, block)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 8
    quantized = (blocks / scale).round().clamp(-8, 7) * scale
    return quantized.reshape(outputs, inputs).T


def best_scale(weight_t: torch.Tensor, activations: torch.Tensor, mean_abs: torch.Tensor,
               block: int) -> tuple[torch.Tensor, float]:
    """The s (per input channel) minimising |x W - (x / s) Q(s W)| over ALPHAS. Returns (s, alpha)."""
    reference = activations @ weight_t
    best = (torch.ones_like(mean_abs), 0.0, float("inf"))
    for alpha in ALPHAS:
        scale = mean_abs.clamp_min(1e-8) ** alpha
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = float(((activations / scale) @ fake_quantize_4bit(weight_t * scale[:, None], block)
                       - reference).pow(2).mean())
        if error < best[2]:
            best = (scale, alpha, error)
    return best[0], best[1]


@torch.no_grad()
def collect_activations(model: torch.nn.Module, token_lists: Sequence[Sequence[int]]) -> dict[str, dict]:
    """Per projection input (q_proj, o_proj, gate_proj, down_proj of every layer): mean |x| per channel and a
    sample of rows."""
    stats: dict[str, dict] = {}
    generator = torch.Generator().manual_seed(0)

    def hook(name: str):
        def record(module, inputs):
            rows = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            entry = stats.setdefault(name, {"sum": torch.zeros(rows.shape[1]), "count": 0, "rows": []})
            entry["sum"] += rows.abs().sum(0)
            entry["count"] += rows.shape[0]
            keep = torch.randperm(rows.shape[0], generator=generator)[:max(1, SAMPLE_ROWS // len(token_lists))]
            entry["rows"].append(rows[keep])
        return record

    handles = []
    for index, layer in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            module = layer.get_submodule(name)
            handles.append(module.register_forward_pre_hook(hook(f"model.layers.{index}.{name}")))
    try:
        for tokens in token_lists:
            model(torch.tensor([list(tokens)]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: {"mean_abs": entry["sum"] / entry["count"], "rows": torch.cat(entry["rows"])}
            for name, entry in stats.items()}


def apply_awq(model: torch.nn.Module, token_lists: Sequence[Sequence[int]], block: int) -> dict[str, float]:
    """Rescale `model`'s weights in place (same function, friendlier to 4-bit); returns the alpha chosen per
    projection group."""
    config = model.config
    arch = architecture_of(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    stats = collect_activations(model, token_lists)
    chosen: dict[str, float] = {}
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}"
            attention, mlp = layer.self_attn, layer.mlp
            # Row folds first (o into v, down into up), then the column scalings of the norms' consumers.
            entry = stats[f"{prefix}.self_attn.o_proj"]
            # o_proj channel (h, d) reads v channel (h // repeats, d): one scale per kv channel, shared by its heads.
            repeats = heads // kv_heads
            tied = entry["mean_abs"].reshape(kv_heads, repeats, head_dim).mean(1)
            scale, chosen[f"{prefix}.o_proj"] = best_scale(
                attention.o_proj.weight.T, entry["rows"], tied.repeat_interleave(repeats, 0).reshape(-1), block)
            attention.o_proj.weight.mul_(scale[None, :])
            per_v_channel = scale.reshape(kv_heads, repeats, head_dim)[:, 0].reshape(-1)
            attention.v_proj.weight.div_(per_v_channel[:, None])
            if attention.v_proj.bias is not None:
                attention.v_proj.bias.div_(per_v_channel)

            entry = stats[f"{prefix}.mlp.down_proj"]
            scale, chosen[f"{prefix}.down_proj"] = best_scale(mlp.down_proj.weight.T, entry["rows"],
                                                              entry["mean_abs"], block)
            mlp.down_proj.weight.mul_(scale[None, :])
            mlp.up_proj.weight.div_(scale[:, None])

            for norm, projections, key in (
                    (layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj), "self_attn.q_proj"),
                    (getattr(layer, arch.mlp_norm), (mlp.gate_proj, mlp.up_proj), "mlp.gate_proj")):
                entry = stats[f"{prefix}.{key}"]
                weight_t = torch.cat([projection.weight for projection in projections]).T
                scale, chosen[f"{prefix}.{key.split('.')[1].split('_')[0]}_in"] = best_scale(
                    weight_t, entry["rows"], entry["mean_abs"], block)
                for projection in projections:
                    projection.weight.mul_(scale[None, :])
                offset = arch.norm_weight_offset
                norm.weight.copy_((norm.weight + offset) / scale - offset)
    return chosen

