"""The reference a cohort member is held to: its trial as a plain PEFT model, trained by a plain loop.

    losses, eval_loss = train_alone("tiny-gemma3", data_dir, TrainSection(lora_r=8, ...), max_seq_len=128)

What PEFT does for one trial: `get_peft_model` with the trial's LoraConfig (the seed's
modules_to_save for `embeddings: full`, TrainableTokens for `new_tokens`, PEFT's fp32 adapters),
the same data order (trainable.data.train_batches), the loss summed over each optimizer step's
reply tokens and divided by their number, gradients clipped, the project's optimizer and schedule.
tests/unit/test_reference.py ties this loop to Hugging Face Trainer itself; the cohort's tests tie
every member to this loop. Not package code: the project trains every trial as a cohort member.
"""

from __future__ import annotations

from typing import Any

import torch

from core.schema import TrainSection
from trainable.loss import decoder_and_head


def peft_model(model_id: str, train: TrainSection, embeddings: str = "frozen", template_ids: tuple[int, ...] = ()) -> tuple[Any, Any]:
    """(the PEFT model of this trial on a freshly loaded base, its device)."""
    from peft import LoraConfig, get_peft_model

    from trainable.model import _load_base, embedding_config, lora_target_pattern, pick_device_and_dtype, resolve_embeddings

    device, dtype = pick_device_and_dtype(train.dtype)
    model = _load_base(model_id, train, None, device, dtype)
    policy, _ = resolve_embeddings(embeddings, model, list(template_ids))
    lora = LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout, target_modules=lora_target_pattern(model, train.target_modules),
                      bias="none", task_type="CAUSAL_LM", **embedding_config(model, policy, list(template_ids)))  # fmt: skip
    torch.manual_seed(train.seed)  # the adapter's initial weights depend only on the seed
    return get_peft_model(model, lora), device


def _chunk_loss(hidden: Any, targets: Any, lm_head: Any, softcap: float | None) -> Any:
    import torch.nn.functional as F

    logits = lm_head(hidden).float()
    if softcap:
        logits = (logits / softcap).tanh() * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def summed_loss(model: Any, input_ids: Any, position_ids: Any, loss_index: Any, targets: Any, chunk_tokens: int = 4096) -> Any:
    """Sum of next-token cross-entropy over the positions in `loss_index`, lm_head a chunk at a time."""
    from torch.utils.checkpoint import checkpoint

    decoder, lm_head, softcap = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, loss_index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        total = total + (checkpoint(_chunk_loss, h, t, lm_head, softcap, use_reentrant=False) if torch.is_grad_enabled() else _chunk_loss(h, t, lm_head, softcap))
    return total


def _on(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(model: Any, ds: Any, batch_size: int, pad_id: int, device: Any) -> float:
    """Token-weighted mean loss over every reply token of `ds`."""
    from trainable.data import eval_batches

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(ds, batch_size, pad_id):
            if batch["loss_tokens"]:
                b = _on(batch, device)
                total += float(summed_loss(model, b["input_ids"], b["position_ids"], b["loss_index"], b["targets"]))
                count += batch["loss_tokens"]
    model.train()
    return total / max(count, 1)


def train_alone(model_id: str, data_dir: str, train: TrainSection, max_seq_len: int = 128, embeddings: str = "frozen",
                template_ids: tuple[int, ...] = ()) -> tuple[list[float], float]:  # fmt: skip
    """(the training loss of each optimizer step, the final eval loss) of the trial as a plain PEFT model."""
    from trainable.cohort import build_optimizer, build_schedule
    from trainable.data import load_split, train_batches

    model, device = peft_model(model_id, train, embeddings, template_ids)
    train_ds, eval_ds = load_split(data_dir, "train"), load_split(data_dir, "eval")
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, train, device)
    schedule = build_schedule(optimizer, train)
    micro, accum = train.batch
    batches = train_batches(train_ds, micro, train.seed, 0, pad_id)
    model.train()
    losses = []
    for _ in range(train.max_steps):
        step = [next(batches) for _ in range(accum)]
        n_loss = sum(b["loss_tokens"] for b in step)
        total = 0.0
        for batch in step:
            b = _on(batch, device)
            loss = summed_loss(model, b["input_ids"], b["position_ids"], b["loss_index"], b["targets"]) / max(n_loss, 1)
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, evaluate(model, eval_ds, train.eval_batch_size or micro, pad_id, device)
