"""Where the loss is: the decoder and lm_head of a causal LM, and the positions that carry loss.

Only positions whose next token carries loss (the replies) reach lm_head: Gemma 3's vocabulary
has 262k entries, lm_head is one of the largest matmuls in the model, and reply tokens are a
fraction of all tokens. The cohort's loss (trainable/cohort.py) sends those positions through
lm_head a chunk at a time (each chunk's logits live only inside a checkpointed function), all at
once (train.loss: model), or fused with the cross-entropy by liger-kernel.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100


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
