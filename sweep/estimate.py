"""Memory estimates from a model's shape alone (pure arithmetic; no torch).

For now: the activation memory a decoder keeps for backward, which decides
`gradient_checkpointing: auto`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextShape:
    """The numbers of a decoder-only text model that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: object) -> "TextShape":
        """From a transformers config; multimodal configs contribute their text part."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab=text.vocab_size,
        )


def layer_activation_bytes(shape: TextShape, tokens: int, bytes_per_value: int = 2) -> int:
    """Activations the decoder layers save for backward without checkpointing.

    Per token and layer (fused attention, so no seq x seq matrix): the normed inputs and residuals
    (~4 x hidden, Gemma has four norms per layer), q/k/v and the attention output
    (heads + 2 kv_heads + heads) x head_dim, and the MLP's gate, up, activation and product
    (4 x intermediate).
    """
    attention = (2 * shape.heads + 2 * shape.kv_heads) * shape.head_dim
    per_token_layer = 4 * shape.hidden + attention + 4 * shape.intermediate
    return shape.layers * tokens * per_token_layer * bytes_per_value


def wants_checkpointing(shape: TextShape, tokens: int, device_bytes: int, share: float = 0.25) -> bool:
    """auto: recompute activations when keeping them would take more than `share` of the device."""
    return layer_activation_bytes(shape, tokens) > share * device_bytes
