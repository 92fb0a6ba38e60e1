"""One forward pass over a packed batch of sequences, with a paged KV cache.

The batching engine calls `DecoderStep.forward` once per step with the tokens of every running
sequence packed into one (N, hidden) tensor: one token for each decoding sequence, a chunk of
the prompt for each sequence in prefill. The layers are the base model's own modules (so a
quantized base and the LoRA wrappers just work); what is written here is the part that
transformers' forward does not offer: per-row positions, writing K/V into the sequences' blocks,
and attention of rows with different lengths in one call.

The KV cache is `kv.py`'s block pool; the LoRA deltas are `lora.py`'s groups; the shapes come from
`hotpeft.model.arch`, one description for Llama, Mistral, Qwen2, Qwen3 (q/k norms) and Gemma
(norms scaled by 1 + w, GELU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hotpeft.model.arch import Architecture
from hotpeft.server.engine.attention import choose
from hotpeft.server.engine.kv import PagedKVCache
from hotpeft.server.engine.lora import LoraBank


@dataclass
class StepInput:
    """A packed batch: row i owns the packed tokens [last_index[i - 1] + 1, last_index[i]]."""

    embeds: torch.Tensor  # (N, H)
    positions: torch.Tensor  # (N,) long, position of each token in its sequence
    kv_rows: torch.Tensor  # (N,) long, the KV row (block * block_size + offset) each token writes
    last_index: torch.Tensor  # (R,) long, packed index of each row's last token
    attn: dict  # the attention kernel's metadata of this step (`attention.py`)
    sample_rows: torch.Tensor  # (S,) long, rows whose last token's logits are needed
    score_index: torch.Tensor | None = None  # (K,) long, more packed tokens whose logits are needed (echo)


class DecoderStep:
    """One forward pass of a Llama-family decoder over a packed batch."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, kv: PagedKVCache, bank: LoraBank,
                 max_model_len: int):
        arch.check_context(max_model_len)
        self.model = model
        self.kv = kv
        self.layers = model.model.layers
        self.norm = model.model.norm
        self.rotary = model.model.rotary_emb
        self.lm_head = model.lm_head
        self.embed = model.get_input_embeddings()
        self.n_heads = arch.num_heads
        self.n_kv = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scaling = self.head_dim ** -0.5
        self.rope_sign = torch.ones(self.head_dim, dtype=self.embed.weight.dtype, device=self.embed.weight.device)
        self.rope_sign[:self.head_dim // 2] = -1
        self.silu = arch.hidden_act == "silu"
        self.eps, self.norm_offset, self.qk_norm = arch.rms_norm_eps, arch.norm_offset, arch.qk_norm
        self.fused = self._fuse()
        self.attention = choose(self.embed.weight.device, self.embed.weight.dtype, self.n_heads, self.n_kv,
                                self.head_dim, kv.block_size)
        # Per layer: the LoRA groups (q|k|v, o, gate|up, down); None where a layer has no such projections.
        self.lora = [tuple(bank.group(i, g) for g in ("qkv", "o", "gate_up", "down")) for i in range(len(self.layers))]

    def _fuse(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
        """Per layer: q|k|v weight and bias, gate|up weight, concatenated so that one matmul does each group.

        Only for plain linear bases (not int8/nf4). The original modules' weights become views of
        the concatenation, so no memory is added and everything else still sees the same weights.
        """
        fused = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            gu = [mlp.gate_proj, mlp.up_proj]
            plain = all(type(m) is torch.nn.Linear for m in qkv + gu)
            if not plain or not self.silu:
                fused.append((None, None, None))
                continue
            fused.append((self._concat([m.weight for m in qkv]),
                          self._concat([m.bias for m in qkv]) if qkv[0].bias is not None else None,
                          self._concat([m.weight for m in gu])))
        return fused

    @staticmethod
    def _concat(params: list[torch.nn.Parameter]) -> torch.Tensor:
        whole = torch.cat([p.data for p in params])
        start = 0
        for p in params:
            p.data = whole[start:start + p.shape[0]]
            start += p.shape[0]
        return whole

    def _qkv(self, li: int, h: torch.Tensor) -> torch.Tensor:
        """(N, (n_heads + 2 n_kv) * d): projections plus their LoRA deltas."""
        attn = self.layers[li].self_attn
        w, b, _ = self.fused[li]
        out = F.linear(h, w, b) if w is not None else torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], -1)
        group = self.lora[li][0]
        return out if group is None else group.add_delta(out, h)

    def _o(self, li: int, a: torch.Tensor) -> torch.Tensor:
        out = self.layers[li].self_attn.o_proj(a)
        group = self.lora[li][1]
        return out if group is None else group.add_delta(out, a)

    def _mlp(self, li: int, h: torch.Tensor) -> torch.Tensor:
        mlp = self.layers[li].mlp
        _, _, w = self.fused[li]
        _, _, g_gu, g_down = self.lora[li]
        if w is None and g_gu is None and g_down is None:
            return mlp(h)
        gu = F.linear(h, w) if w is not None else torch.cat([mlp.gate_proj(h), mlp.up_proj(h)], -1)  # (N, 2I)
        if g_gu is not None:
            gu = g_gu.add_delta(gu, h)
        inter = gu.shape[-1] // 2
        act = (F.silu if self.silu else mlp.act_fn)(gu[:, :inter]) * gu[:, inter:]
        out = mlp.down_proj(act)
        return out if g_down is None else g_down.add_delta(out, act)

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.norm_offset:  # Gemma: x normed and scaled by (1 + w) in float32, then cast back
            return F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float() + self.norm_offset, self.eps).type_as(x)
        return F.rms_norm(x, (x.shape[-1],), norm.weight, self.eps)

    def forward(self, step: StepInput) -> torch.Tensor:
        """Run all layers; returns logits (S, V) of the rows in `step.sample_rows`, then (K, V) of the
        tokens in `step.score_index` when given."""
        x = step.embeds  # (N, H)
        n_tok = x.shape[0]
        d, n_kv, nh = self.head_dim, self.n_kv, self.n_heads
        cos, sin = self.rotary(x, step.positions.unsqueeze(0))  # (1, N, d)
        half = d // 2
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated): 4 ops per RoPE.
        cos, sin = cos[0].unsqueeze(1), (sin[0] * self.rope_sign).unsqueeze(1)  # (N, 1, d)
        for li, layer in enumerate(self.layers):
            h = self._norm(layer.input_layernorm, x)
            qkv = self._qkv(li, h).view(n_tok, nh + 2 * n_kv, d)
            qk = qkv[:, :nh + n_kv]
            if self.qk_norm:  # Qwen3: each head's q and k RMS-normed before RoPE
                attn = layer.self_attn
                qk = torch.cat([self._norm(attn.q_norm, qk[:, :nh]), self._norm(attn.k_norm, qk[:, nh:])], 1)
            qk = qk * cos + qk.roll(half, dims=-1) * sin  # RoPE on q and k at once
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + n_kv:]
            K, V = self.kv.k[li], self.kv.v[li]
            K[step.kv_rows] = k
            V[step.kv_rows] = v
            out = self.attention(q, K, V, step.attn, n_kv, self.scaling).reshape(n_tok, nh * d)
            x = x + self._o(li, out)
            x = x + self._mlp(li, self._norm(layer.post_attention_layernorm, x))
        at = step.last_index[step.sample_rows]
        if step.score_index is not None:
            at = torch.cat([at, step.score_index])
        last = x[at]  # (S [+ K], H)
        return self.lm_head(self._norm(self.norm, last))
