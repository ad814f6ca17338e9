"""The joint VLM + expert transformer pass, one function for every way SmolVLA runs it.

A pass takes up to three groups of tokens: VLM tokens already encoded (only their per-layer
keys/values, `PrefixCache`), new VLM tokens, and expert (action) tokens. The three uses:

- LeRobot's training forward: no cache; new VLM tokens = the whole prefix; expert = actions.
- The no-grad prefix (training): image + language tokens are encoded under `no_grad` into a
  cache; then the state token (new VLM token) and the actions run with autograd.
- Inference: the whole prefix is encoded once into a cache; each denoising step runs only
  the actions against it.

Numerics follow LeRobot 0.6.1's `SmolVLMWithExpertModel`: eager attention with query and key
cast to float32 (under bf16 autocast the matmuls still run in bf16, as in LeRobot: autocast
casts their inputs back; tests/unit/policy/test_attention_bf16.py measures the difference;
`train.attention_fp32` opts into float32 attention),
masked logits set to the dtype's minimum, RoPE with wavelength 10,000 (LeRobot's
`apply_rope`, not the text config's `rope_theta`), and in cross-attention layers the
expert's positions restart at 0.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smolvla_ray.policy.backbone import SmolVLMWithExpert

ROPE_WAVELENGTH = 10_000


@dataclass
class PrefixCache:
    """Per VLM layer, the post-RoPE keys and values of encoded VLM tokens, (B, L, H_kv, D)."""

    keys: list[Tensor]
    values: list[Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


def apply_rope(x: Tensor, positions: Tensor) -> Tensor:
    """Rotary embedding of `x` (B, L, H, D) at integer `positions` (B, L), in float32."""
    d_half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.to(torch.float32)
    exponents = (2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32, device=x.device)
    timescale = ROPE_WAVELENGTH**exponents
    radians = positions[..., None].to(torch.float32) / timescale[None, None, :]
    radians = radians[..., None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x.split(d_half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)


def eager_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor,
    *,
    num_kv_groups: int,
    fp32: bool = False,
) -> Tensor:
    """Masked softmax attention with grouped KV heads; (B, Lq, H*D) out.

    `fp32` (the spec's `train.attention_fp32`) keeps autocast out: both matmuls and the
    softmax run in float32 and the output is float32, a deviation from LeRobot (whose bf16
    runs do them in bf16) for users who want the attention exact at some speed cost."""
    batch, q_len, num_heads, head_dim = query.shape
    key = key.repeat_interleave(num_kv_groups, dim=2) if num_kv_groups > 1 else key
    value = value.repeat_interleave(num_kv_groups, dim=2) if num_kv_groups > 1 else value
    exact = torch.autocast(query.device.type, enabled=False) if fp32 else nullcontext()
    with exact:
        if fp32:
            value = value.to(torch.float32)
        q = query.to(torch.float32).transpose(1, 2)
        k = key.to(torch.float32).transpose(1, 2)
        weights = torch.matmul(q, k.transpose(2, 3)) * head_dim**-0.5
        weights = torch.where(mask[:, None, :, :], weights, torch.finfo(weights.dtype).min)
        probs = nn.functional.softmax(weights, dim=-1).to(value.dtype)
        out = torch.matmul(probs, value.transpose(1, 2))
    return out.transpose(1, 2).reshape(batch, q_len, num_heads * head_dim)


def _project_qkv(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden).to(dtype=attn.q_proj.weight.dtype)
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    return (
        attn.q_proj(normed).view(shape),
        attn.k_proj(normed).view(shape),
        attn.v_proj(normed).view(shape),
    )


def _finish_layer(layer: nn.Module, hidden: Tensor, attn_out: Tensor) -> Tensor:
    """Output projection, residual, MLP, residual (a Llama decoder layer after attention)."""
    out_proj = layer.self_attn.o_proj
    out = out_proj(attn_out.to(out_proj.weight.dtype)) + hidden
    return layer.mlp(layer.post_attention_layernorm(out)) + out


def run_layers(
    towers: SmolVLMWithExpert,
    *,
    vlm_hidden: Tensor | None,
    expert_hidden: Tensor | None,
    vlm_positions: Tensor | None,
    expert_positions: Tensor | None,
    mask: Tensor,
    cache: PrefixCache | None = None,
    build_cache: bool = False,
    vlm_output: bool = True,
) -> tuple[Tensor | None, Tensor | None, PrefixCache | None]:
    """Run every layer over the given token groups.

    `mask` is (B, Nq, Nk) bool with queries = [new VLM tokens, expert tokens] and
    keys = [cached tokens, new VLM tokens, expert tokens]. Returns the final-normed VLM and
    expert hidden states and, with `build_cache`, the cache of [cached + new] VLM tokens.
    `vlm_output=False` skips work that only the VLM tokens' outputs need (their last
    layer's MLP and the final norm), for a pass whose VLM outputs nobody reads.
    """
    if vlm_hidden is None and expert_hidden is None:
        raise ValueError("run_layers needs VLM tokens, expert tokens or both")
    num_cached = cache.length if cache is not None else 0
    num_vlm = vlm_hidden.shape[1] if vlm_hidden is not None else 0
    num_prefix = num_cached + num_vlm
    groups = towers.num_attention_heads // towers.num_key_value_heads
    text_layers = towers.text_model.layers
    new_cache = PrefixCache([], []) if build_cache else None
    last = towers.num_vlm_layers - 1

    for index in range(towers.num_vlm_layers):
        vlm_layer = text_layers[index]
        expert_layer = towers.expert_layer(index) if expert_hidden is not None else None
        # Keys/values of all VLM tokens at this layer: cached ones plus the new ones.
        q_vlm = None
        if vlm_hidden is not None:
            q_vlm, k_vlm, v_vlm = _project_qkv(vlm_layer, vlm_hidden)
            q_vlm = apply_rope(q_vlm, vlm_positions)
            k_vlm = apply_rope(k_vlm, vlm_positions)
            if cache is not None:
                k_vlm = torch.cat([cache.keys[index], k_vlm], dim=1)
                v_vlm = torch.cat([cache.values[index], v_vlm], dim=1)
        else:
            k_vlm, v_vlm = cache.keys[index], cache.values[index]
        if new_cache is not None:
            new_cache.keys.append(k_vlm)
            new_cache.values.append(v_vlm)

        attn_vlm = attn_expert = None
        if expert_layer is not None and towers.is_self_attn_layer(index):
            # Joint layer: one attention over [VLM; expert] queries and keys.
            q_exp, k_exp, v_exp = _project_qkv(expert_layer, expert_hidden)
            q_exp = apply_rope(q_exp, expert_positions)
            k_exp = apply_rope(k_exp, expert_positions)
            queries = torch.cat([q_vlm, q_exp], dim=1) if q_vlm is not None else q_exp
            keys = torch.cat([k_vlm, k_exp], dim=1)
            values = torch.cat([v_vlm, v_exp], dim=1)
            attn = eager_attention(
                queries, keys, values, mask, num_kv_groups=groups, fp32=towers.attention_fp32
            )
            attn_vlm, attn_expert = attn[:, :num_vlm], attn[:, num_vlm:]
        else:
            if q_vlm is not None:
                attn_vlm = eager_attention(
                    q_vlm,
                    k_vlm,
                    v_vlm,
                    mask[:, :num_vlm, :num_prefix],
                    num_kv_groups=groups,
                    fp32=towers.attention_fp32,
                )
            if expert_layer is not None:
                # Cross layer: expert queries attend to the VLM keys/values, projected by the
                # expert's own k_proj/v_proj; expert positions restart at 0.
                attn = expert_layer.self_attn
                normed = expert_layer.input_layernorm(expert_hidden).to(attn.q_proj.weight.dtype)
                q_exp = attn.q_proj(normed).view(*normed.shape[:-1], -1, attn.head_dim)
                positions = expert_positions - expert_positions.min(dim=1, keepdim=True).values
                q_exp = apply_rope(q_exp, positions)
                flat_k = k_vlm.to(attn.k_proj.weight.dtype).reshape(*k_vlm.shape[:2], -1)
                flat_v = v_vlm.to(attn.v_proj.weight.dtype).reshape(*v_vlm.shape[:2], -1)
                k_exp = attn.k_proj(flat_k).view(*flat_k.shape[:-1], -1, attn.head_dim)
                v_exp = attn.v_proj(flat_v).view(*flat_v.shape[:-1], -1, attn.head_dim)
                attn_expert = eager_attention(
                    q_exp,
                    k_exp,
                    v_exp,
                    mask[:, num_vlm:, :num_prefix],
                    num_kv_groups=groups,
                    fp32=towers.attention_fp32,
                )

        if vlm_hidden is not None and (vlm_output or index < last):
            vlm_hidden = _finish_layer(vlm_layer, vlm_hidden, attn_vlm)
        if expert_layer is not None:
            expert_hidden = _finish_layer(expert_layer, expert_hidden, attn_expert)

    vlm_out = towers.text_model.norm(vlm_hidden) if vlm_hidden is not None and vlm_output else None
    expert_out = towers.lm_expert.norm(expert_hidden) if expert_hidden is not None else None
    return vlm_out, expert_out, new_cache
