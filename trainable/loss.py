"""Causal-LM loss without materialising the whole fp32 logits tensor.

Gemma 3's vocabulary has 262k entries: for a micro-batch of 8 x 1024 tokens, logits in fp32 are
8.6 GB, and the standard loss keeps them (plus their softmax gradient) alive until backward. Here
the decoder's last hidden states go through lm_head in chunks of tokens; each chunk's logits live
only inside a checkpointed function, so forward keeps one chunk at a time and backward recomputes
it. The lm_head module itself is called (plain, LoRA, modules_to_save or trainable-token rows), so
every embedding policy trains exactly as with the model's own loss.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100


def _chunk_loss(hidden: Any, labels: Any, lm_head: Any, softcap: float | None) -> Any:
    import torch.nn.functional as F

    logits = lm_head(hidden).float()
    if softcap:
        logits = (logits / softcap).tanh() * softcap
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def decoder_and_head(model: Any) -> tuple[Any, Any, float | None]:
    """(text decoder, lm_head, final logit softcap) of a (PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    return base.model, base.lm_head, getattr(config, "final_logit_softcapping", None)


def loss_positions(labels: Any) -> tuple[Any, Any]:
    """(flat indices into the [batch, seq-1] predicting positions, their target ids), on labels' device.

    Position t predicts token t+1. Computed by the data collator on the CPU, so that the training
    step needs no device-to-host sync to know which positions carry loss.
    """
    shifted = labels[:, 1:].reshape(-1)
    index = (shifted != IGNORE).nonzero().flatten()
    return index, shifted[index]


def summed_loss(model: Any, input_ids: Any, position_ids: Any, loss_index: Any, targets: Any, chunk_tokens: int = 4096) -> Any:
    """Sum of next-token cross-entropy over the positions in `loss_index` (divide by the count yourself)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    decoder, lm_head, softcap = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    # Only positions whose next token carries loss reach lm_head: reply tokens are a fraction of
    # all tokens, and lm_head (hidden x 262k) is one of the largest matmuls in the model.
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, loss_index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, t, lm_head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, t, lm_head, softcap)
    return total
