"""The one description of the decoder architectures hotpeft serves (Llama, Mistral, Qwen2, Qwen3, Gemma).

Everything that needs to know a base model's shape reads it here, from its config alone (no
weights): the engine (heads, KV bytes, sliding window), the LoRA bank (projection groups and
shapes), adapter validation (which modules exist and their shapes), the trainer's target modules
and the benchmark's synthetic adapters.

    arch = Architecture.from_config(model.config)
    arch.projection_shapes()["model.layers.0.self_attn.q_proj"]  # (out_features, in_features)
"""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")

# The projections an adapter may target, in the order of a layer's outputs.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION + MLP
# Projections that read the same input form a group: one matmul serves all members.
GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
            "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
GROUPS = ("qkv", "o", "gate_up", "down")
# the layer block each group sits in
PART_OF = {"qkv": "self_attn", "o": "self_attn", "gate_up": "mlp", "down": "mlp"}


class UnsupportedModel(ValueError):
    """The base model is not one of the decoder architectures the engine implements."""


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float  # every norm is an RMSNorm with this epsilon
    hidden_act: str  # the MLP is act(gate) * up -> down
    attention_bias: bool  # q|k|v carry biases (Qwen2)
    sliding_window: int | None  # None: full attention
    qk_norm: bool = False  # q and k are RMS-normed per head before RoPE (Qwen3)
    norm_offset: float = 0.0  # norms scale by (offset + weight), computed in float32 (Gemma: 1)
    # RoPE: positions are rotated by the model's own rotary embedding module (its scaling included)

    @classmethod
    def from_config(cls, config) -> Architecture:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(f"hotpeft serves {', '.join(SUPPORTED_MODEL_TYPES)} models; this one is "
                                   f"{model_type or '?'!r}")
        heads = config.num_attention_heads
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        return cls(
            model_type=model_type, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size, max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048)),
            rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)), hidden_act=getattr(config, "hidden_act", "silu"),
            attention_bias=bool(getattr(config, "attention_bias", model_type == "qwen2")),
            sliding_window=window or None, qk_norm=model_type == "qwen3",
            norm_offset=1.0 if model_type == "gemma" else 0.0,
        )

    def projection_shape(self, projection: str) -> tuple[int, int]:
        """(out_features, in_features) of one projection of any layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}[projection]

    @staticmethod
    def module_name(layer: int, projection: str) -> str:
        """The module's name in the model (and, after PEFT's prefix, in an adapter's tensors)."""
        return f"model.layers.{layer}.{PART_OF[GROUP_OF[projection]]}.{projection}"

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Every targetable module name -> (out_features, in_features): what adapters are checked against."""
        return {self.module_name(layer, p): self.projection_shape(p)
                for layer in range(self.num_layers) for p in PROJECTIONS}

    def groups(self) -> list[tuple[int, str, tuple[str, ...]]]:
        """(layer, group, member module names in output order) for every projection group."""
        return [(layer, g, tuple(self.module_name(layer, p) for p in PROJECTIONS if GROUP_OF[p] == g))
                for layer in range(self.num_layers) for g in GROUPS]

    def kv_bytes_per_token(self, element_size: int) -> int:
        """K and V of every layer for one position."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    def check_context(self, context: int) -> None:
        """The engine attends over the whole context; a sliding window shorter than it is not implemented."""
        if self.sliding_window and self.sliding_window < context:
            raise UnsupportedModel(
                f"this model attends over a sliding window of {self.sliding_window} tokens, which the batching "
                f"engine does not implement; start the server with --max-model-len {self.sliding_window} or less")
