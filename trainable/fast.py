"""The fast step's pieces a cohort uses (train.lora_dtype, train.loss: liger, train.compile).

- `resolve_lora_dtype`: what train.lora_dtype (float32, bfloat16, auto) means on a base of a given
  compute dtype (trainable/cohort.py and multi_lora.py compute the adapters accordingly).
- `liger_sum`: liger-kernel's fused linear + cross-entropy over given rows, never materialising a
  chunk of logits in fp32 (a cohort calls it once per member: each member has its own normaliser);
  `require_liger` the one error where it cannot run. Gemma 3's final_logit_softcapping is passed
  through (liger supports softcap; Gemma 3 sets None).
- `compile_layers`: torch.compile per decoder layer (regional compilation: one compiled graph per
  distinct layer kind, reused across layers, so compile time does not grow with depth).

liger-kernel and Triton are imported only when `loss: liger` is used.
"""

from __future__ import annotations

from typing import Any

COMPILE_BACKEND = "inductor"  # torch.compile's backend for train.compile (tests on a CPU may use aot_eager)


def resolve_lora_dtype(requested: str, compute_dtype: Any) -> str:
    """train.lora_dtype as it runs on a base computing in `compute_dtype` (a torch dtype or its name):
    "bfloat16" (LoRA computed in bf16, fp32 masters) or "float32" (PEFT's fp32 adapter: the input
    cast up for the adapter branch, the update cast back). auto is bfloat16 on a bf16 base, else
    float32; bfloat16 asked for on a base that is not bf16 runs in float32 too (nothing to gain:
    the activations are not bf16)."""
    if requested not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"train.lora_dtype: {requested!r}; expected auto, bfloat16 or float32")
    bf16_base = str(compute_dtype).removeprefix("torch.") == "bfloat16"
    return "bfloat16" if requested in ("auto", "bfloat16") and bf16_base else "float32"


# ----------------------------------------------------------------------------------------------
# liger-kernel's fused linear + cross-entropy


def liger_unavailable() -> str | None:
    """Why `loss: liger` cannot run here (None when it can)."""
    import torch

    if not torch.cuda.is_available():
        return "liger-kernel runs Triton kernels and needs a CUDA GPU; this machine has none (use loss: chunked)"
    try:
        import inspect

        from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return f"liger-kernel is not importable ({type(exc).__name__}: {exc}); pip install 'lora-sweep[gpu]', or use loss: chunked"
    if "chunk_mem_const" not in inspect.signature(LigerFusedLinearCrossEntropyFunction.forward).parameters:
        return "this liger-kernel is older than 0.8.5 (no chunk_mem_const: its chunks would be a few tokens each); pip install 'lora-sweep[gpu]', or use loss: chunked"
    return None


def require_liger() -> None:
    """Raise, in the words every `loss: liger` user sees, when liger-kernel cannot run here."""
    reason = liger_unavailable()
    if reason:
        raise RuntimeError(f"train.loss: liger: {reason}")


def head_weight(lm_head: Any) -> Any:
    """The weight the fused loss multiplies by: lm_head's (a plain linear layer; with embeddings:
    full, the member's trained copy, tied to it)."""
    import torch

    if not isinstance(lm_head, torch.nn.Linear) or lm_head.bias is not None:
        raise ValueError(f"train.loss: liger needs lm_head to be a plain linear layer; got {type(lm_head).__name__}. Use loss: chunked.")
    return lm_head.weight


from core.rules import LIGER_CHUNK_TOKENS  # noqa: E402 - tokens per chunk of liger's loss (why: core/rules.py)


def liger_sum(weight: Any, hidden: Any, targets: Any, softcap: float | None) -> Any:
    """Sum over rows of the cross-entropy of (hidden @ weight^T, softcapped) against `targets`,
    fused by liger-kernel (the logits never exist whole, LIGER_CHUNK_TOKENS rows of them at a time);
    fp32. Call require_liger() first."""
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    from trainable.loss import IGNORE

    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    c = liger_chunk_const(weight.shape[0], weight.shape[1], hidden.shape[0])
    loss = LigerFusedLinearCrossEntropyFunction.apply(
        hidden, weight, targets, None, None, IGNORE, 0.0, 0.0, "sum", softcap, False, None, False, False, False, None, None, c
    )[0]  # fmt: skip
    return loss.float()


def liger_chunk_const(vocab: int, width: int, tokens: int) -> int:
    """The largest chunk_mem_const whose chunks hold at most LIGER_CHUNK_TOKENS tokens (1, liger's
    own, where even its chunks are larger: a small vocabulary)."""
    c = max(1, -(-vocab // (width * max(1, -(-tokens // LIGER_CHUNK_TOKENS)))))
    while c > 1 and liger_chunk(vocab, width, tokens, c) > LIGER_CHUNK_TOKENS:
        c -= 1  # a step or two: liger's rounding (ceil, then the next power of two)
    return c


def liger_chunk(vocab: int, width: int, tokens: int, c: int) -> int:
    """Tokens per chunk of liger-kernel's fused linear + cross-entropy (0.8.5,
    ops/fused_linear_cross_entropy.py) at chunk_mem_const `c`."""
    per = -(-tokens // -(-vocab // (c * width)))
    return min(1 << (per - 1).bit_length(), tokens)


# ----------------------------------------------------------------------------------------------
# torch.compile per decoder layer


def decoder_layers(model: Any) -> Any:
    return model.get_decoder().layers


def compile_layers(model: Any, dynamic: bool | None = None) -> int:
    """Compile each decoder layer in place (COMPILE_BACKEND); returns how many. A cohort's rows
    change with its members: it passes dynamic=True (trainable.cohort)."""
    import torch

    # Sliding-window and global layers differ in attributes the graph guards on, and eval adds its own
    # shapes: allow for those recompiles instead of falling back to eager after the default limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=COMPILE_BACKEND, dynamic=dynamic)
    return len(layers)
