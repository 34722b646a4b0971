"""The fast-step switches of a trial (train.lora_dtype, train.loss: liger, train.compile), in one place.

- `MasterWeights`: LoRA A/B held in bf16 on the model, so the bf16 activations meet bf16 weights and a
  LoRA layer computes with no dtype casts (PEFT otherwise keeps adapters in fp32 and casts the
  input up and the output back in every layer, forward and backward). The optimizer never sees the
  bf16 tensors: it steps fp32 master copies. Each bf16 gradient is added into its master's fp32
  .grad as soon as autograd has it (a post-accumulate hook), so gradient accumulation over
  micro-batches also runs in fp32; after the optimizer step the masters are rounded back into the
  model. Nothing here is specific to one adapter: the multi-adapter cohort layer can hand it any
  set of low-rank parameters.
- `resolve_lora_dtype`: the one rule for what train.lora_dtype (float32, bfloat16, auto) means on a
  base of a given compute dtype; a trial alone (`prepare`) and a cohort (trainable/cohort.py) use it.
- `liger_summed_loss`: liger-kernel's fused linear + cross-entropy over the reply positions only
  (the same positions as the chunked loss), never materialising a chunk of logits in fp32.
  Gemma 3's final_logit_softcapping is passed through (liger supports softcap; Gemma 3 sets None).
  `liger_sum` is its fused op alone (a cohort calls it once per member: each member has its own
  normaliser), `require_liger` the one error where it cannot run.
- `compile_layers`: torch.compile per decoder layer (regional compilation: one compiled graph per
  distinct layer kind, reused across layers, so compile time does not grow with depth).
- CUDA graphs (train.cuda_graphs): the compiled layers in inductor's reduce-overhead mode, so each
  layer's kernels replay as one graph instead of being launched one by one from Python: for steps
  bound by launching kernels (small micro-batches), not by the GPU. Only with bf16 LoRA, whose fp32
  masters take each gradient out of the graphs' memory at once. Off where it cannot hold: without
  CUDA, and with gradient checkpointing (which re-runs each layer inside the backward).

liger-kernel and Triton are imported only when `loss: liger` is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LORA_PARAM_NAMES = ("lora_A", "lora_B")


# ----------------------------------------------------------------------------------------------
# LoRA in bf16, fp32 master weights


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


class MasterWeights:
    """fp32 masters for low-rank parameters kept on the model in a low-precision dtype."""

    def __init__(self, params: list, dtype: Any):
        import torch

        self.params = list(params)
        # Copied before the cast, so the masters start exactly at the fp32 initialisation.
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.to(dtype)
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in self.params]

    @classmethod
    def for_lora(cls, model: Any, dtype: Any) -> "MasterWeights":
        params = [p for name, p in model.named_parameters() if p.requires_grad and any(f".{n}." in name for n in LORA_PARAM_NAMES)]
        return cls(params, dtype)

    def _accumulate(self, param: Any) -> None:
        master = self._master_of[id(param)]
        if master.grad is None:
            master.grad = param.grad.float()
        else:
            master.grad.add_(param.grad)
        param.grad = None

    def optimizer_params(self, params: list) -> list:
        """`params` with each low-precision LoRA tensor replaced by its fp32 master (order kept)."""
        return [self._master_of.get(id(p), p) for p in params]

    def copy_to_model(self) -> None:
        """After optimizer.step(): the updated masters, rounded into the model's tensors."""
        import torch

        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.masters)

    def state_dict(self) -> dict[str, Any]:
        return {"masters": [m.detach().cpu() for m in self.masters]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """From a checkpoint; without master state (an fp32-LoRA checkpoint), from the model's tensors."""
        import torch

        with torch.no_grad():
            sources = state["masters"] if state else [p.detach() for p in self.params]
            for master, source in zip(self.masters, sources, strict=True):
                master.copy_(source)
        self.copy_to_model()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


# ----------------------------------------------------------------------------------------------
# liger-kernel's fused linear + cross-entropy


def liger_unavailable() -> str | None:
    """Why `loss: liger` cannot run here (None when it can)."""
    import torch

    if not torch.cuda.is_available():
        return "liger-kernel runs Triton kernels and needs a CUDA GPU; this machine has none (use loss: chunked)"
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return f"liger-kernel is not importable ({type(exc).__name__}: {exc}); pip install liger-kernel, or use loss: chunked"
    return None


def require_liger() -> None:
    """Raise, in the words every `loss: liger` user sees, when liger-kernel cannot run here."""
    reason = liger_unavailable()
    if reason:
        raise RuntimeError(f"train.loss: liger: {reason}")


def head_weight(lm_head: Any) -> Any:
    """The weight the fused loss multiplies by: a plain Linear's, or the trained copy of `embeddings: full`."""
    import torch

    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    if isinstance(lm_head, ModulesToSaveWrapper):
        lm_head = lm_head.original_module if lm_head.disable_adapters else lm_head.modules_to_save[lm_head.active_adapters[0]]
    if isinstance(lm_head, TrainableTokensWrapper) or not isinstance(lm_head, torch.nn.Linear) or lm_head.bias is not None:
        raise ValueError(
            f"train.loss: liger needs lm_head to be a plain linear layer (embeddings: frozen or full); got {type(lm_head).__name__}. "
            "With embeddings: new_tokens use loss: chunked."
        )
    return lm_head.weight


_LIGER: dict[float | None, Any] = {}


def liger_sum(weight: Any, hidden: Any, targets: Any, softcap: float | None) -> Any:
    """Sum over rows of the cross-entropy of (hidden @ weight^T, softcapped) against `targets`,
    fused by liger-kernel (the logits never exist whole); fp32. Call require_liger() first."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    from trainable.loss import IGNORE

    if softcap not in _LIGER:
        _LIGER[softcap] = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", softcap=softcap)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return _LIGER[softcap](weight, hidden, targets).float()


def liger_summed_loss(model: Any, input_ids: Any, position_ids: Any, loss_index: Any, targets: Any) -> Any:
    """Sum of next-token cross-entropy over `loss_index` positions, lm_head + loss fused by liger-kernel."""
    from trainable.loss import decoder_and_head

    require_liger()
    decoder, lm_head, softcap = decoder_and_head(model)
    weight = head_weight(lm_head)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, loss_index)
    return liger_sum(weight, hidden, targets, softcap)


# ----------------------------------------------------------------------------------------------
# torch.compile per decoder layer


def decoder_layers(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().layers


def compile_layers(model: Any, backend: str = "inductor", dynamic: bool | None = None, mode: str | None = None) -> int:
    """Compile each decoder layer in place; returns how many. Shapes are static within a trial
    (packed rows of max_seq_len), so the graphs are too; eval batches may add a dynamic variant.
    A cohort's rows change with its members: it passes dynamic=True (trainable.cohort).
    mode "reduce-overhead" (inductor only) replays each layer as a CUDA graph."""
    import os

    import torch

    backend = os.environ.get("LORA_SWEEP_COMPILE_BACKEND", backend)  # aot_eager: the CPU dry run, without C++ builds
    # Sliding-window and global layers differ in attributes the graph guards on, and eval adds its own
    # shapes: allow for those recompiles instead of falling back to eager after the default limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    layers = decoder_layers(model)
    options = {"mode": mode} if mode is not None and backend == "inductor" else {}  # other backends (aot_eager) take no mode
    for layer in layers:
        layer.compile(backend=backend, dynamic=dynamic, **options)
    return len(layers)


def cuda_graphs_off_reason(model: Any, masters: bool = True) -> str | None:
    """Why CUDA graphs cannot replay this trial's compiled layers (None: they can). `masters`: the
    LoRA gradients go to fp32 masters at once, not into .grad tensors that live in the graphs'
    memory until the next replay overwrites them."""
    if not masters:
        return "LoRA is not in bf16 with fp32 masters (the compute dtype is not bfloat16), so its gradients would stay in the graphs' memory"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_gradient_checkpointing", False):
        return "gradient checkpointing is on: it re-runs each layer inside the backward, which a replayed graph cannot"
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"no CUDA device (the model is on {device.type})"
    return None


_GRAPHS_RECORDED = False  # a trial in this process replayed CUDA graphs (forget_cuda_graphs)


def forget_cuda_graphs() -> None:
    """At a trial's end: if it recorded CUDA graphs, drop them and the compiled code with them.
    A warm worker keeps the base model for the next trial, whose new adapter tensors would make the
    graph trees record again beside the old recordings and their memory pool; the next trial pays
    its compile again instead."""
    global _GRAPHS_RECORDED
    if _GRAPHS_RECORDED:
        import torch

        torch._dynamo.reset()  # also resets the CUDA graph trees (global state)
        _GRAPHS_RECORDED = False


# ----------------------------------------------------------------------------------------------
# the trial's view


@dataclass
class FastStep:
    """What the switches changed in one trial: masters to step (or None) and what to log."""

    masters: MasterWeights | None = None
    info: dict[str, Any] = field(default_factory=dict)
    cuda_graphs: bool = False

    def begin_forward(self) -> None:
        """Before each forward (a micro-batch, an eval batch): with CUDA graphs, tell the graph
        trees a new iteration starts, so the previous replay's outputs may be overwritten (they
        have been consumed: its backward ran, or it was an eval forward)."""
        if self.cuda_graphs:
            import torch

            torch.compiler.cudagraph_mark_step_begin()

    def optimizer_params(self, params: list) -> list:
        return self.masters.optimizer_params(params) if self.masters else params

    def after_optimizer_step(self) -> None:
        if self.masters:
            self.masters.copy_to_model()

    def state_dict(self) -> dict[str, Any] | None:
        return self.masters.state_dict() if self.masters else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.masters:
            self.masters.load_state_dict(state)


def prepare(model: Any, train: Any, compute_dtype: Any) -> FastStep:
    """Apply train.lora_dtype / train.loss / train.compile to a freshly built PEFT model."""
    import torch

    step = FastStep()
    if resolve_lora_dtype(train.lora_dtype, compute_dtype) == "bfloat16":
        step.masters = MasterWeights.for_lora(model, torch.bfloat16)
        step.info["lora_dtype"] = f"bfloat16 ({len(step.masters.params)} tensors, fp32 masters)"
    elif train.lora_dtype == "bfloat16":  # dtype auto on a machine without bf16: nothing to gain, keep the adapter in fp32
        step.info["lora_dtype"] = f"float32 (compute dtype is {str(compute_dtype).removeprefix('torch.')}, not bfloat16)"
    else:
        step.info["lora_dtype"] = "float32"
    if train.loss == "liger":
        require_liger()
        head_weight(decoder_and_head_of(model))  # fails now, not at the first step, on new_tokens
    step.info["loss"] = train.loss
    global _GRAPHS_RECORDED
    if getattr(train, "cuda_graphs", False):  # gone from newer schemas: never on there
        reason = cuda_graphs_off_reason(model, masters=step.masters is not None)
        step.cuda_graphs = _GRAPHS_RECORDED = reason is None
        step.info["cuda_graphs"] = "on" if reason is None else f"off ({reason})"
    mode = "reduce-overhead" if step.cuda_graphs else None
    step.info["compiled_layers"] = compile_layers(model, mode=mode) if train.compile is True else 0  # "auto" left undecided: off
    return step


def decoder_and_head_of(model: Any) -> Any:
    from trainable.loss import decoder_and_head

    return decoder_and_head(model)[1]
