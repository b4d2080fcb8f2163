"""A compact Llama-family forward over a flat batch of tokens from many requests.

RMSNorm, RoPE (with the config's scaling), grouped-query attention over a paged KV cache and
SwiGLU; projection biases and per-layer sliding windows as the config says (loader.py lists what
is accepted; a checkpoint tensor the forward does not read is refused at load). Tokens of all requests of one iteration are flattened into one (T, hidden) tensor, so
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
    """Requests whose queries are padded to one length and attended in one call over their
    own KV blocks (gathered through the block tables)."""

    q_index: torch.Tensor  # (B, Qmax) long, flat token index (padding points at a valid token)
    block_tables: torch.Tensor  # (B, max_blocks) long (padding: the request's first block, masked)
    mask: torch.Tensor  # (B, 1, Qmax, max_blocks * block_size) bool, True: query may attend key
    dst_rows: torch.Tensor  # (N,) long, flat token index of each real query row
    src_rows: torch.Tensor | None  # (N,) long rows of the (B * Qmax) output; None: all rows
    q_positions: torch.Tensor | None = None  # (B, 1, Qmax, 1) long, -1 on padding rows

    def window_mask(self, window: int) -> torch.Tensor:
        """`mask` restricted to a sliding window: key position k is seen by the query at
        position p iff p - window < k <= p (transformers' sliding_window_overlay). Key index
        == key position (block tables cover positions from 0). Padded rows keep key 0."""
        assert self.q_positions is not None, "build the group with build_group"
        keys = torch.arange(self.mask.shape[-1], device=self.mask.device)
        return self.mask & (keys > self.q_positions - window)


@dataclass(frozen=True, slots=True)
class StepInputs:
    """The flat inputs of one iteration (built once, shared by every layer)."""

    token_ids: torch.Tensor  # (T,) long
    positions: torch.Tensor  # (T,) long
    slot_mapping: torch.Tensor  # (T,) long, cache slot each new token's KV is written to
    groups: tuple[AttentionGroup, ...]
    block_size: int


def build_group(
    spans: list[tuple[int, int, int, list[int]]], block_size: int, device: torch.device
) -> AttentionGroup:
    """`spans`: per request (token offset in the flat batch, computed tokens, new tokens,
    block table covering positions 0..computed+new-1)."""
    q_max = max(n for _, _, n, _ in spans)
    num_blocks = max(len(t) for *_, t in spans)
    q_index: list[list[int]] = []
    q_pos: list[list[int]] = []
    tables: list[list[int]] = []
    src: list[int] = []
    dst: list[int] = []
    for i, (offset, computed, new, table) in enumerate(spans):
        q_index.append(list(range(offset, offset + new)) + [offset] * (q_max - new))
        q_pos.append(list(range(computed, computed + new)) + [-1] * (q_max - new))
        tables.append(table + table[:1] * (num_blocks - len(table)))  # own block: no other's NaN
        src.extend(range(i * q_max, i * q_max + new))
        dst.extend(range(offset, offset + new))
    pos = torch.tensor(q_pos, dtype=torch.long)
    keys = torch.arange(num_blocks * block_size)[None, None, :]
    mask = keys <= pos[:, :, None]  # causal; keys past the context are beyond every position
    mask[:, :, 0] |= pos < 0  # padded query rows attend one key so no row is all masked
    return AttentionGroup(
        q_index=torch.tensor(q_index, dtype=torch.long, device=device),
        block_tables=torch.tensor(tables, dtype=torch.long, device=device),
        mask=mask[:, None].to(device),
        dst_rows=torch.tensor(dst, dtype=torch.long, device=device),
        src_rows=None if len(src) == len(spans) * q_max else torch.tensor(src, device=device),
        q_positions=pos[:, None, :, None].to(device),
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
        used: set[str] = set()

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in tensors:
                raise ModelError(f"the model weights lack {name!r}; the folder is incomplete")
            used.add(name)
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ModelError(
                    f"weight {name!r} has shape {tuple(t.shape)}, the config implies {shape}"
                )
            return t.to(self.device).contiguous()

        h = c.hidden_size
        self.embed = take("embed_tokens.weight", (c.vocab_size, h))
        self.norm = take("norm.weight", (h,))
        if "lm_head.weight" in tensors:  # transformers 5 reads a saved head even when tied
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
            biased = {"qkv": c.qkv_bias, "o_proj": c.o_proj_bias, "gate_up": c.mlp_bias,
                      "down_proj": c.mlp_bias}
            for fused, members in FUSED_GROUPS.items():
                if biased[fused]:
                    biases = [
                        take(f"{p}{'self_attn' if m in ATTN_MODULES else 'mlp'}.{m}.bias",
                             (c.module_shape(m)[0],))
                        for m in members
                    ]
                    layer[fused + ".bias"] = torch.cat(biases) if len(biases) > 1 else biases[0]
            self.layers.append(layer)
        leftover = sorted(n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq"))
        if leftover:
            shown = ", ".join(leftover[:5]) + (f" and {len(leftover) - 5} more" if len(leftover) > 5 else "")
            raise ModelError(
                f"the checkpoint holds tensors the model code does not use: {shown}; serving it "
                "without them would be silently wrong (a bias the config does not enable, an "
                "lm_head bias, or modules of another architecture)"
            )
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
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: StepInputs,
        masks: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """`masks`: one per group in place of `group.mask` (a sliding-window layer)."""
        out = torch.empty_like(q)
        scale = self.config.head_dim**-0.5
        bs = step.block_size
        k_blocks = k_cache.view(-1, bs, *k_cache.shape[1:])
        v_blocks = v_cache.view(-1, bs, *v_cache.shape[1:])
        for n, g in enumerate(step.groups):
            qg = q[g.q_index].transpose(1, 2)  # (B, H, Qmax, D)
            kg = k_blocks[g.block_tables].flatten(1, 2).transpose(1, 2)  # (B, KVH, L, D)
            vg = v_blocks[g.block_tables].flatten(1, 2).transpose(1, 2)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask if masks is None else masks[n], scale=scale,
                enable_gqa=True,
            ).transpose(1, 2)  # (B, Qmax, H, D)
            rows = og.reshape(-1, *og.shape[2:])
            if len(step.groups) == 1 and g.src_rows is None and rows.shape[0] == q.shape[0]:
                return rows  # one group holding every token in order (a pure decode batch)
            out.index_copy_(0, g.dst_rows, rows if g.src_rows is None else rows[g.src_rows])
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
        window_masks: dict[int, tuple[torch.Tensor, ...]] = {}  # built once per window size
        for i, layer in enumerate(self.layers):
            window = c.window(i)
            if window is not None and window not in window_masks:
                window_masks[window] = tuple(g.window_mask(window) for g in step.groups)
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
            masks = None if window is None else window_masks[window]
            a = self._attention(q, k_cache, v_cache, step, masks).reshape(t, -1)
            x = x + self._linear(i, "o_proj", a, lora)
            h = _rms_norm(x, layer["post_norm"], c.rms_norm_eps)
            gate, up = self._linear(i, "gate_up", h, lora).chunk(2, dim=-1)
            x = x + self._linear(i, "down_proj", F.silu(gate) * up, lora)
        return _rms_norm(x, self.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, vocab) float32 logits of the given hidden states."""
        return F.linear(hidden, self.lm_head).float()
