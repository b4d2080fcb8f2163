"""A compact Llama-family forward over a flat batch of tokens from many requests.

RMSNorm, RoPE (with the config's scaling), grouped-query attention over a paged KV cache and
SwiGLU. Tokens of all requests of one iteration are flattened into one (T, hidden) tensor, so
prefill and decode of requests of different lengths share every linear layer; attention runs
per group (decodes together, prefills together) over each request's own blocks. In unmerged
mode a `LoraHook` adds each token's adapter side path after every target projection
(PAPER.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from dlora.errors import ModelError
from dlora.exec.loader import LlamaConfig, load_model_folder, rope_inv_freq

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_MODULES = TARGET_MODULES[:4]
# Projections that read the same input run as one fused matmul (and one LoRA call).
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class LoraHook(Protocol):
    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the LoRA side paths of fused `group` (a FUSED_GROUPS key) in `layer` to its
        output `y` in place."""


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """Requests whose queries are padded to one length and attended in one call."""

    q_index: torch.Tensor  # (B, Qmax) long, flat token index (padding points at a valid token)
    q_valid: torch.Tensor  # (B, Qmax) bool
    kv_slots: torch.Tensor  # (B, Lmax) long, cache slots of positions 0..L-1 (padding: 0)
    mask: torch.Tensor  # (B, 1, Qmax, Lmax) bool, True where a query may attend a key


@dataclass(frozen=True, slots=True)
class StepInputs:
    """The flat inputs of one iteration (built once, shared by every layer)."""

    token_ids: torch.Tensor  # (T,) long
    positions: torch.Tensor  # (T,) long
    slot_mapping: torch.Tensor  # (T,) long, cache slot each new token's KV is written to
    groups: tuple[AttentionGroup, ...]


def build_group(
    spans: list[tuple[int, int, int, list[int]]], device: torch.device
) -> AttentionGroup:
    """`spans`: per request (token offset in the flat batch, computed tokens, new tokens,
    cache slots of positions 0..computed+new-1)."""
    q_max = max(n for _, _, n, _ in spans)
    l_max = max(len(s) for *_, s in spans)
    q_index: list[list[int]] = []
    q_pos: list[list[int]] = []
    kv_slots: list[list[int]] = []
    for offset, computed, new, slots in spans:
        q_index.append(list(range(offset, offset + new)) + [offset] * (q_max - new))
        q_pos.append(list(range(computed, computed + new)) + [-1] * (q_max - new))
        kv_slots.append(slots + [0] * (l_max - len(slots)))
    pos = torch.tensor(q_pos, dtype=torch.long)
    lens = torch.tensor([len(s) for *_, s in spans], dtype=torch.long)[:, None, None]
    keys = torch.arange(l_max)[None, None, :]
    mask = (keys <= pos[:, :, None]) & (keys < lens)
    mask[:, :, 0] |= pos < 0  # padded query rows attend one key so no row is all masked
    return AttentionGroup(
        q_index=torch.tensor(q_index, dtype=torch.long, device=device),
        q_valid=(pos >= 0).to(device),
        kv_slots=torch.tensor(kv_slots, dtype=torch.long, device=device),
        mask=mask[:, None].to(device),
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op; same math as below
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    """Weights as plain tensors: `layers[i][name]` for the projections and norms, so adapters
    can be merged into them in place. Not an nn.Module: nothing here needs autograd."""

    def __init__(
        self, config: LlamaConfig, tensors: dict[str, torch.Tensor], device: str = "cpu"
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        c = config

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in tensors:
                raise ModelError(f"the model weights lack {name!r}; the folder is incomplete")
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ModelError(
                    f"weight {name!r} has shape {tuple(t.shape)}, the config implies {shape}"
                )
            return t.to(self.device).contiguous()

        h = c.hidden_size
        self.embed = take("embed_tokens.weight", (c.vocab_size, h))
        self.norm = take("norm.weight", (h,))
        if "lm_head.weight" in tensors:
            self.lm_head = take("lm_head.weight", (c.vocab_size, h))
        elif c.tie_word_embeddings:
            self.lm_head = self.embed
        else:
            raise ModelError("the model weights lack 'lm_head.weight' and do not tie embeddings")
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            layer = {
                "input_norm": take(p + "input_layernorm.weight", (h,)),
                "post_norm": take(p + "post_attention_layernorm.weight", (h,)),
            }
            for fused, members in FUSED_GROUPS.items():
                parts = []
                for m in members:
                    group = "self_attn" if m in ATTN_MODULES else "mlp"
                    parts.append(take(f"{p}{group}.{m}.weight", c.module_shape(m)))
                layer[fused] = torch.cat(parts) if len(parts) > 1 else parts[0]
                start = 0
                for m, part in zip(members, parts, strict=True):  # row views: merge in place
                    layer[m] = layer[fused][start : start + part.shape[0]]
                    start += part.shape[0]
            if c.attention_bias:
                layer["qkv.bias"] = torch.cat(
                    [
                        take(f"{p}self_attn.{m}.bias", (c.module_shape(m)[0],))
                        for m in FUSED_GROUPS["qkv"]
                    ]
                )
            self.layers.append(layer)
        self._inv_freq = rope_inv_freq(c).to(self.device)
        self.dtype = self.embed.dtype

    @classmethod
    def from_folder(
        cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> LlamaModel:
        config, tensors = load_model_folder(path, dtype)
        return cls(config, tensors, device)

    def weight(self, layer: int, module: str) -> torch.Tensor:
        """The (d_out, d_in) weight of one projection: a row view into its fused group."""
        return self.layers[layer][module]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (T, 1, head_dim): rotating x is
        `x * cos + x.roll(head_dim / 2) * signed_sin`, the same as HF's rotate_half form."""
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)
        signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        return cos.to(self.dtype)[:, None, :], signed_sin.to(self.dtype)[:, None, :]

    def _linear(self, i: int, m: str, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        y = F.linear(x, self.layers[i][m], self.layers[i].get(m + ".bias"))
        if lora is not None:
            lora.apply(i, m, x, y)
        return y

    def _attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: StepInputs
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        scale = self.config.head_dim**-0.5
        for g in step.groups:
            qg = q[g.q_index].transpose(1, 2)  # (B, H, Qmax, D)
            kg = k_cache[g.kv_slots].transpose(1, 2)  # (B, KVH, Lmax, D)
            vg = v_cache[g.kv_slots].transpose(1, 2)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=True
            ).transpose(1, 2)
            out[g.q_index[g.q_valid]] = og[g.q_valid]
        return out

    @torch.inference_mode()
    def forward(
        self, step: StepInputs, kv_pool: torch.Tensor, lora: LoraHook | None = None
    ) -> torch.Tensor:
        """Hidden states (T, hidden) after the final norm; writes the new tokens' KV into
        `kv_pool` (layers, 2, slots, kv_heads, head_dim) at `step.slot_mapping`."""
        c = self.config
        x = self.embed[step.token_ids]
        cos, sin = self._rope(step.positions)
        t = x.shape[0]
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer["input_norm"], c.rms_norm_eps)
            qkv = self._linear(i, "qkv", h, lora)
            q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            qk = qkv[:, : q_size + kv_size].view(t, c.num_heads + c.num_kv_heads, c.head_dim)
            qk = qk * cos + qk.roll(c.head_dim // 2, dims=-1) * sin
            q, k = qk.split((c.num_heads, c.num_kv_heads), dim=1)
            v = qkv[:, q_size + kv_size :].view(t, c.num_kv_heads, c.head_dim)
            k_cache, v_cache = kv_pool[i, 0], kv_pool[i, 1]
            k_cache[step.slot_mapping] = k
            v_cache[step.slot_mapping] = v
            a = self._attention(q, k_cache, v_cache, step).reshape(t, -1)
            x = x + self._linear(i, "o_proj", a, lora)
            h = _rms_norm(x, layer["post_norm"], c.rms_norm_eps)
            gate, up = self._linear(i, "gate_up", h, lora).chunk(2, dim=-1)
            x = x + self._linear(i, "down_proj", F.silu(gate) * up, lora)
        return _rms_norm(x, self.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, vocab) float32 logits of the given hidden states."""
        return F.linear(hidden, self.lm_head).float()
