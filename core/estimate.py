"""Peak GPU memory of a trial, predicted from the model's shape and the trial's settings.

Pure arithmetic (no torch): the model is described by a ModelProfile (parameter counts per kind of
layer, read once from the model's config on the meta device by trainable.model.profile_model), the
trial by TrialShape. The prediction is the sum of what is alive at the peak of a training step,
the end of the forward pass, when every saved activation and the loss's logits coexist:

  weights      decoder linears in bf16 (QLoRA: NF4 with double quantization, ~0.516 bytes/param),
               embeddings and norms in bf16, a vision tower if the checkpoint has one
  adapter      LoRA A/B in fp32 + their gradients + optimizer state
  embeddings   `full`: a trainable copy of embed_tokens + gradient + optimizer state (twice if the
               head is untied); `new_tokens`: a few rows
  activations  the decoder's saved tensors (all layers, or with checkpointing only each layer's
               input plus one layer being recomputed); the fp32 copies of every LoRA input that PEFT
               keeps for backward; eager attention's score matrices; QLoRA's dequantised weight
  logits       model loss: every token's logits in bf16 (kept by the model's output), the fp32
               log-softmax and its gradient, ~12 bytes per token and vocabulary entry;
               chunked loss: the same for one chunk of at most 4096 reply tokens;
               liger loss: one chunk of at most rules.LIGER_CHUNK_TOKENS reply tokens' logits in
               bf16 (liger writes their gradient in place and keeps no fp32 copy)

It answers "peak allocated" (torch.cuda.max_memory_allocated). Calibrated on an H200 against
bench/results-*.json; the CUDA context and allocator slack (CONTEXT_BYTES, which placement adds)
are not in that figure. Its error against every measurement, in sample and out of sample:
bench/BENCH.md, "VRAM estimator: in-sample and out-of-sample error (issue 16)" (placement adds
resources.memory_margin on top).

Placement (`resources.gpus_per_trial: auto`) turns the estimate into the share of a GPU a trial
asks Ray for: the estimated peak plus a safety margin, plus what the process holds outside
PyTorch's allocator (the CUDA context, allocator slack), over the GPU's memory, rounded up to a
twentieth so that trials of similar size can share a warm worker. Configs whose share exceeds one
GPU are infeasible: never launched, recorded as such, and reported to Optuna as failed so it
learns the boundary. The model's profile comes from the driver (trainable.model.profile_model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from core import rules

GB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, 8-bit absmax per 64, fp32 per 256 absmax blocks
LOSS_CHUNK = 4096
OVERHEAD = 0.25 * GB  # cuBLAS workspaces, small buffers, allocator rounding


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


@dataclass(frozen=True)
class ModelProfile:
    """Parameter counts of a causal LM, by what memory they cost."""

    text: TextShape
    linears: dict[str, tuple[int, int, int]]  # decoder leaf name -> (in_features, out_features, layers that have it)
    embedding_params: int  # vocab x hidden
    tied: bool  # lm_head shares embed_tokens
    other_params: int  # norms and anything else in the language model, kept in the compute dtype
    vision_linear_params: int = 0  # a vision tower's linears (quantized with the rest under QLoRA)
    vision_other_params: int = 0

    @property
    def decoder_linear_params(self) -> int:
        return sum(i * o * n for i, o, n in self.linears.values())


@dataclass(frozen=True)
class TrialShape:
    """The settings of one trial that memory depends on."""

    method: str = "lora"
    lora_r: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_dropout: float = 0.05
    embeddings: str = "frozen"  # full | new_tokens | frozen
    embedding_rows: int = 2
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit
    micro_batch: int = 1
    seq_len: int = 1024
    checkpointing: bool = False
    attn: str = "sdpa"
    loss: str = "chunked"
    reply_fraction: float = 0.5  # share of tokens that carry loss (chunked loss only sends those to lm_head)
    dtype_bytes: int = 2


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes by component

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def gb(self) -> float:
        return self.total / GB


def _state_bytes(optimizer: str, param_bytes: int) -> float:
    """Optimizer state per parameter: torch AdamW keeps two moments in the parameter's dtype; the
    bitsandbytes 8-bit ones one byte each."""
    return 2.0 if optimizer.endswith("8bit") else 2.0 * param_bytes


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


def wants_checkpointing(shape: TextShape, tokens: int, device_bytes: int) -> bool:
    """auto: recompute activations when keeping them would take more than a quarter of the device."""
    return rules.gradient_checkpointing("auto", layer_activation_bytes(shape, tokens), device_bytes)


def estimate(profile: ModelProfile, trial: TrialShape) -> Estimate:
    t, b = profile.text, trial.dtype_bytes
    tokens = trial.micro_batch * trial.seq_len
    qlora = trial.method == "qlora"
    parts: dict[str, float] = {}

    linear_bytes = NF4_BYTES if qlora else b
    head = 0 if profile.tied else profile.embedding_params
    parts["weights"] = (
        profile.decoder_linear_params * linear_bytes
        + (profile.embedding_params + head + profile.other_params) * b
        + profile.vision_linear_params * linear_bytes
        + profile.vision_other_params * b
    )

    targeted = [profile.linears[n] for n in trial.targets if n in profile.linears]
    lora_params = sum(trial.lora_r * (i + o) * n for i, o, n in targeted)
    parts["adapter"] = lora_params * (4 + 4 + _state_bytes(trial.optimizer, 4))

    if trial.embeddings == "full":
        copies = 1 if profile.tied else 2
        parts["embeddings"] = copies * profile.embedding_params * (b + b + _state_bytes(trial.optimizer, b))
    elif trial.embeddings == "new_tokens":
        parts["embeddings"] = (1 if profile.tied else 2) * trial.embedding_rows * t.hidden * (3 * b + 4)

    # inputs of the LoRA layers, cast to fp32 and kept for the A-gradient (+ dropout's mask)
    lora_saved_per_token_layer = sum(i * n for i, _, n in targeted) / t.layers * (4 + (1 if trial.lora_dropout > 0 else 0))
    per_layer = layer_activation_bytes(t, tokens, b) / t.layers + tokens * lora_saved_per_token_layer
    attn_scores = trial.micro_batch * t.heads * trial.seq_len**2 * (b + 4) if trial.attn == "eager" else 0
    if trial.checkpointing:
        parts["activations"] = t.layers * tokens * t.hidden * b + per_layer + attn_scores
    else:
        parts["activations"] = t.layers * (per_layer + attn_scores)
    if qlora:
        biggest = max((i * o for i, o, _ in profile.linears.values()), default=0)
        parts["dequantized"] = 2 * biggest * b

    parts["logits"] = loss_bytes(trial.loss, tokens, tokens * trial.reply_fraction, t.vocab, b)
    parts["overhead"] = OVERHEAD
    return Estimate(parts)


def loss_bytes(loss: str, tokens: float, reply_tokens: float, vocab: int, dtype_bytes: int) -> float:
    """The loss's logits at the peak (module docstring): the model's over every token, ~12 bytes a
    value; the chunked loss's over one chunk of reply tokens, the same; liger's one chunk of reply
    tokens in the compute dtype."""
    if loss == "model":
        return tokens * vocab * (dtype_bytes + 10)
    if loss == "liger":
        return min(reply_tokens, rules.LIGER_CHUNK_TOKENS) * vocab * dtype_bytes
    return min(reply_tokens, LOSS_CHUNK) * vocab * (dtype_bytes + 10)


def trial_shape(
    hyper: dict,
    max_seq_len: int,
    text: TextShape,
    embeddings: str = "auto",
    device_bytes: float | None = None,
    attn: str = "sdpa",
    loss: str = "chunked",
    reply_fraction: float = 0.5,
    embedding_rows: int = 2,
) -> TrialShape:
    """A trial's hyperparameters (train section + sampled values) as the estimator sees them.

    `auto` settings resolve as the trainable resolves them: optimizer by method, checkpointing by
    activation size against `device_bytes`; `embeddings: auto` is assumed to train a few rows (it
    costs the same as frozen either way).
    """
    micro = int(hyper["batch"][0])
    checkpointing = rules.gradient_checkpointing(
        hyper["gradient_checkpointing"], layer_activation_bytes(text, micro * max_seq_len), None if device_bytes is None else int(device_bytes)
    )
    return TrialShape(
        method=hyper["method"],
        lora_r=int(hyper["lora_r"]),
        targets=rules.target_names(hyper["target_modules"]),
        lora_dropout=float(hyper["lora_dropout"]),
        embeddings="new_tokens" if embeddings == "auto" else embeddings,
        embedding_rows=embedding_rows,
        optimizer=rules.optimizer(hyper["optimizer"], hyper["method"]),
        micro_batch=micro,
        seq_len=max_seq_len,
        checkpointing=bool(checkpointing),
        attn=attn,
        loss=loss,
        reply_fraction=reply_fraction,
    )


# ----------------------------------------------------------------------------------------------
# placement

CONTEXT_BYTES = 0.75 * GB  # CUDA context + allocator slack per trial process
STEP = 0.05  # shares are multiples of this


@dataclass(frozen=True)
class Verdict:
    """What placement decided for one config."""

    estimate_gb: float
    share: float  # fraction of one GPU to request; > 1 means infeasible
    feasible: bool
    reason: str = ""


@dataclass(frozen=True)
class Placement:
    """Judges sampled configs against one GPU size: the sweep's model, fixed settings and margin."""

    profile: ModelProfile
    gpu_bytes: float
    margin: float
    max_seq_len: int
    embeddings: str
    attn: str
    loss: str
    fixed: dict[str, Any]

    def judge(self, sampled: dict[str, Any]) -> Verdict:
        hyper = {**self.fixed, **sampled}
        shape = trial_shape(hyper, self.max_seq_len, self.profile.text, self.embeddings, self.gpu_bytes, self.attn, self.loss)
        need = estimate(self.profile, shape).total
        share = (need * (1 + self.margin) + CONTEXT_BYTES) / self.gpu_bytes
        gb = need / GB
        if share > 1:
            reason = (
                f"infeasible: estimated peak {gb:.1f} GB (+{self.margin:.0%} margin, +{CONTEXT_BYTES / GB:.2f} GB context) "
                f"exceeds one {self.gpu_bytes / GB:.0f} GB GPU"
            )
            return Verdict(gb, share, False, reason)
        return Verdict(gb, min(1.0, round(math.ceil(share / STEP - 1e-9) * STEP, 2)), True)


# ----------------------------------------------------------------------------------------------
# cohorts (issue 15): one base model, K members training on it (trainable/cohort.py)


def cohort_estimate(profile: ModelProfile, members: list[TrialShape], checkpointing: bool | None = None) -> Estimate:
    """Peak memory of a cohort: what one trial's estimate counts, with the base counted once.

      weights      once, in the members' shared quantization (lora / qlora form separate cohorts)
      adapter      every member's LoRA A/B in fp32 + gradients + optimizer state
      adapter_copies  its 16-bit compute copy (trainable/multi_lora.py)
      activations  the decoder's saved tensors for the concatenated micro-batches (the members'
                   micro_batch x seq_len tokens together); each targeted layer's input is saved
                   once for all members, in the compute dtype (multi_lora.py), plus each member's
                   [tokens, r] product; dropout masks are redrawn in backward, never kept
      dequantized  QLoRA: one layer's weight at a time, once
      logits       one chunk of the cohort's loss (chunked: at most 4096 reply tokens; liger: at
                   most rules.LIGER_CHUNK_TOKENS, in bf16)

    `checkpointing`: the cohort's decision (it decides for everyone); default: any member's.
    """
    if not members:
        return Estimate({})
    first = members[0]
    t, b = profile.text, first.dtype_bytes
    ckpt = any(m.checkpointing for m in members) if checkpointing is None else checkpointing
    parts = dict(estimate(profile, first).parts)  # weights, dequantized and overhead as for one trial
    parts["adapter"] = 0.0
    for m in members:
        targeted = [profile.linears[n] for n in m.targets if n in profile.linears]
        lora_params = sum(m.lora_r * (i + o) * n for i, o, n in targeted)
        parts["adapter"] += lora_params * (4 + 4 + _state_bytes(m.optimizer, 4))
        # the 16-bit compute copy a member keeps beside its fp32 weights (trainable/multi_lora.py)
        parts["adapter_copies"] = parts.get("adapter_copies", 0.0) + lora_params * 2
    tokens = sum(m.micro_batch * m.seq_len for m in members)
    union = {n for m in members for n in m.targets if n in profile.linears}
    x_saved = sum(profile.linears[n][0] * profile.linears[n][2] for n in union) / t.layers * b  # per token and layer
    products = sum(
        m.micro_batch * m.seq_len * m.lora_r * sum(profile.linears[n][2] for n in m.targets if n in profile.linears) / t.layers * b for m in members
    )
    per_layer = layer_activation_bytes(t, tokens, b) / t.layers + tokens * x_saved + products
    attn_scores = sum(m.micro_batch * t.heads * m.seq_len**2 * (b + 4) for m in members) if first.attn == "eager" else 0
    if ckpt:
        parts["activations"] = t.layers * tokens * t.hidden * b + per_layer + attn_scores
    else:
        parts["activations"] = t.layers * (per_layer + attn_scores)
    # the cohort's loss goes member by member (each has its own normaliser), one chunk at a time
    parts["logits"] = loss_bytes(first.loss if first.loss == "liger" else "chunked", tokens, sum(m.micro_batch * m.seq_len * m.reply_fraction for m in members), t.vocab, b)
    return Estimate(parts)


def member_share(profile: ModelProfile, member: TrialShape, members: list[TrialShape], checkpointing: bool | None = None) -> float:
    """Bytes of a cohort's estimate that one member accounts for: its own adapter, its share of
    the activations (by its tokens), and an equal share of what the members hold in common (the
    base weights, the loss chunk, overhead). The shares of all members add up to the estimate."""
    total = cohort_estimate(profile, members, checkpointing)
    alone = cohort_estimate(profile, [member]).parts
    own = alone["adapter"] + alone["adapter_copies"]
    tokens = sum(m.micro_batch * m.seq_len for m in members) or 1
    common = sum(v for k, v in total.parts.items() if k not in ("adapter", "adapter_copies", "activations"))
    return own + total.parts["activations"] * member.micro_batch * member.seq_len / tokens + common / len(members)


@dataclass(frozen=True)
class CohortBudget:
    """What a cohort worker may hold: the sweep's model and fixed settings, and the memory of the
    worker's GPU share (`gpu_bytes`; None on a CPU worker: no limit, estimates only)."""

    profile: ModelProfile
    max_seq_len: int
    fixed: dict[str, Any]
    gpu_bytes: float | None = None
    margin: float = 0.2
    attn: str = "sdpa"
    loss: str = "chunked"
    embeddings: str = "frozen"  # full: the one member trains the whole matrix (a cohort of one)

    fold_tokens: int = rules.COHORT_FOLD_TOKENS

    def shape(self, sampled: dict[str, Any]) -> TrialShape:
        # embeddings as the sweep trains them (new_tokens adds a few rows per member: negligible, so
        # as frozen), the cohort's own loss, and as many of a member's micro-batches in one forward
        # as rules.cohort_fold allows: those are its rows
        hyper = {**self.fixed, **sampled}
        embeddings = "full" if self.embeddings == "full" else "frozen"
        shape = trial_shape(hyper, self.max_seq_len, self.profile.text, embeddings, self.gpu_bytes, self.attn, self.loss)
        micro, accum = hyper["batch"]
        return replace(shape, micro_batch=micro * rules.cohort_fold(int(micro), int(accum), self.max_seq_len, self.fold_tokens))

    def step_plan(self, members: list[dict[str, Any]]) -> tuple[bool, int | None]:
        """(gradient checkpointing, most tokens per forward pass or None for one pass) for these
        members: as configured; or (auto) without checkpointing in one pass while they fit the GPU
        share so; else without checkpointing in passes (core.rules.cohort_passes) when passes of at
        least rules.COHORT_PASS_MIN_TOKENS, and the largest member, fit beside every member's
        adapter; else with checkpointing in one pass. The cohort decides for all its members and
        re-decides as they come and go (trainable/cohort_worker.py), by this same rule."""
        setting = self.fixed.get("gradient_checkpointing", "auto")
        if setting != "auto":
            return bool(setting), None
        if self.gpu_bytes is None or self._need(members, False) <= self.gpu_bytes:
            return False, None
        cap = self._pass_tokens(members)
        return (False, cap) if cap is not None else (True, None)

    def checkpointing(self, members: list[dict[str, Any]]) -> bool:
        """Whether these members train with gradient checkpointing (step_plan's decision)."""
        return self.step_plan(members)[0]

    def _pass_tokens(self, members: list[dict[str, Any]]) -> int | None:
        """The most tokens one pass without checkpointing may hold beside everything else the
        members keep (weights, every adapter and its optimizer state, the loss chunk), or None when
        that is below rules.COHORT_PASS_MIN_TOKENS or the largest member's rows."""
        shapes = [self.shape(m) for m in members]
        tokens = [s.micro_batch * s.seq_len for s in shapes]
        whole = cohort_estimate(self.profile, shapes, False)
        # activation bytes per token: the cohort's mean, or a single member's if higher (a high rank)
        per_token = max([whole.parts["activations"] / sum(tokens)] + [cohort_estimate(self.profile, [s], False).parts["activations"] / n for s, n in zip(shapes, tokens)])
        room = (self.gpu_bytes - CONTEXT_BYTES) / (1 + self.margin) - (whole.total - whole.parts["activations"])
        cap = min(int(room / per_token), sum(tokens))
        return cap if cap >= max(rules.COHORT_PASS_MIN_TOKENS, *tokens) else None

    def _need(self, members: list[dict[str, Any]], checkpointing: bool, pass_tokens: int | None = None) -> float:
        shapes = [self.shape(m) for m in members]
        est = cohort_estimate(self.profile, shapes, checkpointing)
        total = est.total
        if pass_tokens is not None:  # only one pass's activations live at a time
            total -= est.parts["activations"] * (1 - pass_tokens / sum(s.micro_batch * s.seq_len for s in shapes))
        return total * (1 + self.margin) + CONTEXT_BYTES

    def need(self, members: list[dict[str, Any]]) -> float:
        """Bytes the worker's GPU share must hold for these members (with checkpointing and passes
        as `step_plan` decides): estimate, margin, context."""
        return self._need(members, *self.step_plan(members))

    def fits(self, members: list[dict[str, Any]]) -> bool:
        return self.gpu_bytes is None or self.need(members) <= self.gpu_bytes

    def share_gb(self, member: dict[str, Any], members: list[dict[str, Any]]) -> float:
        checkpointing, cap = self.step_plan(members)
        shapes = [self.shape(m) for m in members]
        share = member_share(self.profile, self.shape(member), shapes, checkpointing)
        if cap is not None:  # its share of one pass's activations, not of every member's at once
            tokens = sum(s.micro_batch * s.seq_len for s in shapes)
            mine = self.shape(member).micro_batch * self.shape(member).seq_len / tokens
            share -= cohort_estimate(self.profile, shapes, False).parts["activations"] * mine * (1 - cap / tokens)
        return share / GB

    def size(self, member: dict[str, Any]) -> float:
        """A member's own bytes in any cohort (adapter + its activations): whom an OOM sheds first."""
        return member_share(self.profile, self.shape(member), [self.shape(member)]) - cohort_estimate(self.profile, [self.shape(member)]).parts["weights"]
