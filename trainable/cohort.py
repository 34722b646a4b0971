"""Many trials, one base model (issue 15): train a cohort of trials' LoRA adapters together.

    cohort = Cohort("tiny-gemma3", data_dir, TrainSection(method="lora"), max_seq_len=128)
    a = cohort.add(TrainSection(lora_r=8, learning_rate=1e-3, batch=(2, 4)))
    b = cohort.add(TrainSection(lora_r=32, target_modules="attention", batch=(8, 1), seed=1))
    while cohort.running():
        cohort.step()                      # one micro-step for every running member
    cohort.evaluate()                      # {slot: eval loss}
    cohort.save(a, folder); cohort.remove(a); cohort.restore(folder)   # the base stays loaded

One process holds one frozen base model (bf16 for LoRA, NF4 for QLoRA) and any number of members,
each a trial with its own adapter (rank, alpha, dropout, targets), optimizer, LR schedule, weight
decay, micro-batch x accumulation, data order, eval and checkpoint. Each micro-step concatenates
every running member's next rows into one batch: its next micro-batch, or several of them at once
up to core.rules.COHORT_FOLD_TOKENS (core.rules.cohort_fold: the same gradient in fewer forwards,
since the loss is normalised over the whole optimizer step); every frozen projection runs once on
it, and each member's low-rank update is added to its own rows (trainable/multi_lora.py). A member
steps its optimizer when its own accumulation completes.

A cohort of one member is how a single trial trains: there is no other path. Each member trains as
a plain PEFT model of its trial would (tests/peft_reference.py and tests/unit/test_reference.py hold
it to that, and to Hugging Face Trainer), to float rounding:
- its adapter starts from the values PEFT gives the same seed on the same base (multi_lora.peft_init);
- its data order is train_batches' order for its seed, and its loss is the sum of cross-entropy
  over its reply tokens divided by the reply tokens of its whole optimizer step;
- its gradients are clipped by max_grad_norm, and its optimizer and schedule built by
  build_optimizer / build_schedule below.
Differences: rows are padded to the longest row of the whole cohort batch (the pad tail is its own
packed sequence, so no real token sees it); and dropout masks come from seeds of the member's own
(drawn from its seed) rather than the global RNG, so a member's masks do not depend on who else
trains beside it.

Cohort-wide settings (the base's TrainSection decides for every member; a member's own values of
COHORT_WIDE are not read):
- train.lora_dtype (trainable.fast.resolve_lora_dtype): on a bf16 base, `bfloat16` computes each
  LoRA update in bf16 (fp32 parameters, optimizer and gradient accumulation; bf16 copies refreshed
  after each optimizer step), as a trial alone does with fp32 masters; `float32` computes it in fp32
  as PEFT does for an fp32 adapter on a bf16 model (x cast up, the update cast back: multi_lora.py);
  `auto` is bfloat16 on a bf16 base. On an fp32 base the update is fp32 whatever the setting.
- train.loss: `chunked` (lm_head and cross-entropy a chunk of reply tokens at a time, each chunk
  checkpointed), `model` (the logits of all reply positions at once, neither chunked nor
  checkpointed: the per-token cross-entropy the model's own loss computes), `liger` (liger-kernel's
  fused linear + cross-entropy, one call per member with reduction sum: each member has its own
  normaliser; a new_tokens member's span, whose lm_head columns are its own, is computed chunked).
  liger needs CUDA and liger-kernel: without them the cohort refuses to start, as a trial does.
Embeddings (model.embeddings, one policy for the cohort): `frozen`; `new_tokens` (each member its
own rows of the template tokens, in the input embedding and lm_head's tied columns: `TokenRows`,
PEFT's TrainableTokens for a trial alone; `auto` resolves as for a trial alone); `full` (the
member trains a copy of the whole input embedding, and of lm_head through Gemma's tie:
`WholeEmbedding`, PEFT's modules_to_save for a trial alone). A `full` member trains the whole
matrix and runs alone: such a cohort holds one member at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from core.rules import COHORT_FOLD_TOKENS, cohort_fold, cohort_passes
from core.schema import TrainSection
from trainable.multi_lora import MemberLora, MultiLoraLinear, RowSplit, is_linear, peft_init, refresh_all

# Settings that shape the base model itself: every member of a cohort has the cohort's values.
SHARED = ("method", "dtype", "attn_implementation")
# Settings a member may have but the cohort decides for everyone (they change speed, not results).
COHORT_WIDE = ("gradient_checkpointing", "loss", "eval_batch_size", "lora_dtype", "compile")


def compile_around_adapters(model: Any, layers: Any) -> int:
    """train.compile for a cohort: torch.compile each decoder layer (trainable.fast.compile_layers),
    with the multi-adapter linears left out of the graphs. Traced
    inside, they would tie each graph to the members' layout (who sits in which rows), so every
    member joining or leaving would recompile every layer, until dynamo's limit sent them back to
    eager. Left out, the graphs hold what lies between the projections (norms, rotary embedding,
    attention, the gated activation, residuals), which no member changes; dynamic shapes keep one
    graph per layer kind as the cohort's rows change. Returns how many layers were compiled."""
    from trainable.fast import compile_layers

    for layer in layers:
        layer.forward = torch.compiler.disable(layer.forward, recursive=True)  # this instance only: a graph break per projection
    return compile_layers(model, dynamic=True)


def _resolve_loss(requested: str, device: Any) -> str:
    """train.loss for this cohort: as configured, or auto decided as core.rules.loss decides it
    (liger where CUDA runs and liger-kernel is installed, else chunked)."""
    if requested != "auto":
        return requested
    import importlib.util

    from core.rules import loss

    return loss(requested, device.type == "cuda", importlib.util.find_spec("liger_kernel") is not None)[0]


def build_optimizer(params: list, train: TrainSection, device: Any) -> Any:
    """A member's optimizer (core.rules decides `auto`: paged 8-bit AdamW for QLoRA, AdamW for LoRA)."""
    import torch

    from trainable.model import resolve_optimizer

    name = resolve_optimizer(train)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay, fused=device.type == "cuda")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def build_schedule(optimizer: Any, train: TrainSection) -> Any:
    """A member's learning-rate schedule: linear warm-up over warmup_ratio of max_steps, then cosine, linear or constant."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler
    warmup = int(round(train.warmup_ratio * train.max_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=train.max_steps)


@dataclass
class Member:
    """One trial of the cohort: its adapter, optimizer, schedule, data position and results."""

    slot: int
    name: str
    train: TrainSection
    layers: dict[str, MemberLora]  # wrapped layer name -> this member's adapter there
    optimizer: Any
    schedule: Any
    generator: torch.Generator | None  # draws the member's dropout seed for each micro-step; None without dropout
    step: int = 0  # optimizer steps done
    rows_done: int = 0  # training rows consumed by those steps (the data position a checkpoint keeps)
    tokens: int = 0  # non-padding input tokens trained on
    loss_tokens: int = 0
    status: str = "running"  # running | completed | nan
    history: list[list[float]] = field(default_factory=list)  # [step, train loss, learning rate]
    # the optimizer step in progress
    order: Iterator[int] | None = None
    pending: list[list[int]] = field(default_factory=list)  # its micro-batches not yet run
    group_loss_tokens: int = 0
    step_loss: Any = None  # device tensor: this step's loss so far
    unchecked: list[tuple[int, Any, float]] = field(default_factory=list)  # steps whose loss is not yet on the host
    window: list[list[float]] = field(default_factory=list)  # [step, loss, lr] on the host, of the log_every window in progress
    boundary_generator: Any = None  # the generator state after the last optimizer step
    token_rows: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # new_tokens: "embed" (and "head" if untied) -> rows
    embedding: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # full: "embed" (and "head" if untied) -> whole trained copy

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """What its optimizer steps, in a trial alone's order (PEFT's model.parameters(): the
        embedding copy first, the adapters layer by layer, an untied lm_head's copy last)."""
        first = [self.embedding["embed"]] if "embed" in self.embedding else []
        last = [self.embedding["head"]] if "head" in self.embedding else []
        return first + [p for lora in self.layers.values() for p in (lora.lora_A, lora.lora_B)] + list(self.token_rows.values()) + last

    def losses(self) -> list[float]:
        return [h[1] for h in self.history]


class Cohort:
    """One frozen base model and the members training on it; see the module docstring."""

    def __init__(
        self,
        model_id: str,
        data_dir: str,
        base: TrainSection,
        revision: str | None = None,
        max_seq_len: int = 1024,
        max_rows: int = 8,
        eval_batch_size: int = 4,
        chunk_tokens: int = 4096,
        fold_tokens: int = COHORT_FOLD_TOKENS,
        embeddings: str = "frozen",
        template_ids: tuple[int, ...] = (),
    ):
        """`base` gives the shared settings (method, dtype, attention, gradient_checkpointing) and the
        cohort-wide ones (loss, lora_dtype, compile: module docstring);
        `max_rows`: the most rows one micro-step is expected to hold (gradient_checkpointing auto);
        `embeddings` (model.embeddings: frozen, new_tokens, full or auto) and `template_ids` (the
        special tokens the data uses) decide, for every member alike, whether each member trains its
        own rows of those tokens (new_tokens) or the whole embedding (full: one member at a time),
        as a trial alone would."""
        from trainable.data import IGNORE, load_split
        from trainable.fast import require_liger, resolve_lora_dtype
        from trainable.model import _load_base, _set_checkpointing, decoder_prefix, pick_device_and_dtype, resolve_checkpointing, resolve_embeddings

        if embeddings not in ("frozen", "new_tokens", "full", "auto"):
            raise ValueError(f"model.embeddings: {embeddings!r}; expected frozen, new_tokens, full or auto")

        self.model_id, self.revision, self.base_train = model_id, revision, base
        self.max_seq_len, self.eval_batch_size, self.chunk_tokens = max_seq_len, eval_batch_size, chunk_tokens
        self.fold_tokens = fold_tokens  # 0: one micro-batch per forward, as a trial alone
        self.pass_tokens: int | None = None  # most tokens per forward pass of a micro-step (None: one pass of everyone)
        self.device, self.dtype = pick_device_and_dtype(base.dtype)
        self.loss = _resolve_loss(base.loss, self.device)
        if self.loss == "liger":
            require_liger()  # before the weights load: a trial alone fails the same way, in the same words
        self.lora_dtype = resolve_lora_dtype(base.lora_dtype, self.dtype)
        self.lora_compute = torch.bfloat16 if self.lora_dtype == "bfloat16" else torch.float32  # the members' MemberLora compute dtype
        tick = time.perf_counter()
        self.model = _load_base(model_id, base, revision, self.device, self.dtype)
        weights_done = time.perf_counter()
        self.embeddings, self.embeddings_reason = resolve_embeddings(embeddings, self.model, list(template_ids))
        self.tokens: TokenRows | None = None
        self.whole: WholeEmbedding | None = WholeEmbedding(self.model) if self.embeddings == "full" else None
        self.checkpointing = resolve_checkpointing(base, self.model.config, max_rows * max_seq_len, self.device)
        _set_checkpointing(self.model, self.checkpointing)
        self.split = RowSplit(max_len=max_seq_len)
        self.layers: dict[str, MultiLoraLinear] = {}  # in named_modules order: PEFT's init order
        prefix = decoder_prefix(self.model) + "."
        for name, module in list(self.model.named_modules()):
            if name.startswith(prefix) and is_linear(module):
                parent, _, leaf = name.rpartition(".")
                wrapper = MultiLoraLinear(module, self.split, layer_id=len(self.layers))
                setattr(self.model.get_submodule(parent), leaf, wrapper)
                self.layers[name] = wrapper
        if self.embeddings == "new_tokens":
            self.tokens = TokenRows(self.model, self.split, list(template_ids), self.device)
        # compile "auto" is the driver's to decide (it knows how long the workers train); left over, it compiles nothing
        self.compiled_layers = compile_around_adapters(self.model, self.layers.values()) if base.compile is True else 0
        self.train_ds, self.eval_ds = load_split(data_dir, "train"), load_split(data_dir, "eval")
        self.pad_id = getattr(self.model.config.get_text_config(), "pad_token_id", None) or 0
        labels = self.train_ds["labels"]
        self.row_loss_tokens = [int((row[1:] != IGNORE).sum()) for row in labels]
        self.row_tokens = [len(row) for row in labels]
        self.members: dict[int, Member] = {}
        # where the load's time went, for the worker's progress line (the imports are timed by the caller)
        self.load_phases = {"from_pretrained": weights_done - tick, "layers and data": time.perf_counter() - weights_done}

    def set_checkpointing(self, on: bool) -> None:
        """Turn gradient checkpointing on or off between steps (it changes memory, not results:
        dropout masks are redrawn from seeds in recomputation)."""
        from trainable.model import _set_checkpointing

        if on != self.checkpointing:
            _set_checkpointing(self.model, on)
            self.checkpointing = on

    def plan_checkpointing(self, rows: int) -> bool:
        """Re-decide gradient checkpointing (when the base setting is auto) for micro-steps of
        `rows` sequences in all: the cohort's concatenated batch grows and shrinks with its members."""
        from trainable.model import _set_checkpointing, resolve_checkpointing

        self.checkpointing = resolve_checkpointing(self.base_train, self.model.config, rows * self.max_seq_len, self.device)
        _set_checkpointing(self.model, self.checkpointing)
        return self.checkpointing

    # ------------------------------------------------------------------------------------------
    # membership

    def problems(self, train: TrainSection, embeddings: str | None = None, slot: int | None = None) -> list[str]:
        """Why `train` cannot join this cohort (empty when it can)."""
        from trainable.model import target_names

        out = [
            f"train.{key}: {getattr(train, key)!r}, but this cohort's base is {getattr(self.base_train, key)!r}; a trial joins a cohort with the same {key}"
            for key in SHARED
            if getattr(train, key) != getattr(self.base_train, key)
        ]
        if embeddings == "full" and self.embeddings != "full":
            out.append(f"model.embeddings: full trains the whole embedding matrix; such a trial runs alone, not in a cohort of {self.embeddings} embeddings: "
                       "give it a cohort of its own (Cohort(..., embeddings='full'))")  # fmt: skip
        elif embeddings in ("frozen", "new_tokens") and embeddings != self.embeddings:
            out.append(f"model.embeddings: {embeddings}, but this cohort's members train {self.embeddings} embeddings ({self.embeddings_reason}); "
                       "a trial joins a cohort with the same policy")  # fmt: skip
        others = [m.name for s, m in self.members.items() if s != slot]
        if self.embeddings == "full" and others:
            out.append(f"model.embeddings: full: member {others[0]!r} trains the whole embedding matrix, and a full member runs alone; "
                       "remove it first, or start another cohort for this trial")  # fmt: skip
        leaves = {name.rsplit(".", 1)[-1] for name in self.layers}
        missing = [n for n in target_names(train.target_modules) if n not in leaves]
        if missing:
            out.append(f"train.target_modules: no linear layer named {', '.join(missing)} in the language model; its linear layers are: {', '.join(sorted(leaves))}")
        if slot is not None and slot in self.members:
            out.append(f"slot {slot} is taken by member {self.members[slot].name!r}; remove it first")
        return out

    def add(self, train: TrainSection, name: str | None = None, slot: int | None = None, embeddings: str | None = None) -> int:
        """A new member (fresh adapter, optimizer, schedule, data order) in `slot` or the first free one."""
        from trainable.model import target_names

        problems = self.problems(train, embeddings, slot)
        if problems:
            raise ValueError("cannot add this trial to the cohort:\n" + "\n".join(f"  - {p}" for p in problems))
        if slot is None:
            slot = next(i for i in range(len(self.members) + 1) if i not in self.members)
        names = target_names(train.target_modules)
        targets = [n for n in self.layers if n.rsplit(".", 1)[-1] in names]
        init = peft_init([(self.layers[n].in_features, self.layers[n].out_features) for n in targets], train.lora_r, train.seed, self.dtype)
        layers: dict[str, MemberLora] = {}
        for layer_name, (a, b) in zip(targets, init):
            layer = self.layers[layer_name]
            lora = MemberLora(layer.in_features, layer.out_features, train.lora_r, train.lora_alpha, train.lora_dropout, self.device, self.lora_compute)
            with torch.no_grad():
                lora.lora_A.copy_(a)
                lora.lora_B.copy_(b)
            lora.refresh()
            layer.adapters[str(slot)] = lora
            layers[layer_name] = lora
        generator = None
        if train.lora_dropout > 0:  # one dropout seed per micro-step comes from here (on the CPU: no device sync)
            generator = torch.Generator()
            generator.manual_seed(train.seed)
        rows = self.tokens.new_rows(slot) if self.tokens is not None else {}
        whole = self.whole.attach(slot) if self.whole is not None else {}
        member = Member(slot=slot, name=name or f"member-{slot}", train=train, layers=layers, optimizer=None, schedule=None,
                        generator=generator, token_rows=rows, embedding=whole)  # fmt: skip
        member.optimizer = build_optimizer(member.params, train, self.device)
        member.schedule = build_schedule(member.optimizer, train)
        member.boundary_generator = generator.get_state() if generator is not None else None
        self._seek(member)
        self.members[slot] = member
        return slot

    def remove(self, slot: int) -> Member:
        """Take a member out (finished, pruned, failed): its adapter leaves every layer; the base stays."""
        member = self.members.pop(slot)
        for layer_name in member.layers:
            del self.layers[layer_name].adapters[str(slot)]
        if self.tokens is not None:
            self.tokens.drop(slot)
        if self.whole is not None:
            self.whole.detach()  # the base's own frozen embedding is back: the next member starts from it
        member.optimizer.zero_grad(set_to_none=True)
        return member

    def running(self) -> list[int]:
        return [s for s, m in self.members.items() if m.status == "running"]

    def rewind(self, slot: int) -> None:
        """Back to the member's last optimizer step (after a failed micro-step, e.g. an OOM): the
        accumulation in progress is dropped and redone, as after restore()."""
        m = self.members[slot]
        m.optimizer.zero_grad(set_to_none=True)
        if m.generator is not None and m.boundary_generator is not None:
            m.generator.set_state(m.boundary_generator)
        self._seek(m)

    def sync(self, slot: int) -> None:
        """Bring the member's history and status up to date (its losses read from the device); the
        log_every window in progress ends here (an evaluation's step is logged, as a trial logs it)."""
        self._check(self.members[slot], flush=True)

    def _seek(self, member: Member) -> None:
        """Continue the member's data stream from its last optimizer step (train_batches' order)."""
        from trainable.data import row_order

        member.order = row_order(len(self.train_ds), member.train.seed, member.rows_done)
        member.pending, member.step_loss = [], None

    # ------------------------------------------------------------------------------------------
    # training

    def step(self) -> dict[int, int]:
        """One micro-step: every running member's next micro-batch in one forward and backward (or
        in passes of at most `pass_tokens` tokens: core.rules.cohort_passes); a member whose
        accumulation completes steps its optimizer. Returns {slot: step} for those."""
        active = [self.members[s] for s in sorted(self.running())]
        if not active:
            return {}
        for m in active:
            if not m.pending:  # a new optimizer step: draw all its micro-batches (the loss divides by their reply tokens)
                micro, accum = m.train.batch
                fold = cohort_fold(micro, accum, self.max_seq_len, self.fold_tokens)  # micro-batches per forward: same gradient, fewer forwards
                m.pending = [[next(m.order) for _ in range(micro * fold)] for _ in range(accum // fold)]
                m.group_loss_tokens = sum(self.row_loss_tokens[i] for rows in m.pending for i in rows)
        rows = {m.slot: m.pending.pop(0) for m in active}
        self.split.dropout_seeds = {m.slot: int(torch.randint(2**62, (), generator=m.generator)) for m in active if m.generator is not None}
        self.model.train()
        losses: dict[int, Any] = {}
        for group in cohort_passes([len(rows[m.slot]) * self.max_seq_len for m in active], self.pass_tokens):  # passes: the same gradients, less memory
            part = [active[i] for i in group]
            losses.update(self.forward_backward({m.slot: rows[m.slot] for m in part}, {m.slot: m.group_loss_tokens for m in part}))
        stepped = {}
        for m in active:
            loss = losses[m.slot].detach()
            m.step_loss = loss if m.step_loss is None else m.step_loss + loss
            m.tokens += sum(self.row_tokens[i] for i in rows[m.slot])
            m.loss_tokens += sum(self.row_loss_tokens[i] for i in rows[m.slot])
            if not m.pending:
                self._optimizer_step(m)
                stepped[m.slot] = m.step
        return stepped

    def _optimizer_step(self, m: Member) -> None:
        torch.nn.utils.clip_grad_norm_(m.params, m.train.max_grad_norm)
        lr = m.schedule.get_last_lr()[0]
        m.optimizer.step()
        refresh_all(list(m.layers.values()))  # the compute copies (bf16 base) follow the fp32 parameters
        m.schedule.step()
        m.optimizer.zero_grad(set_to_none=True)
        m.step += 1
        micro, accum = m.train.batch
        m.rows_done += micro * accum
        m.unchecked.append((m.step, m.step_loss, lr))
        m.step_loss = None
        if m.generator is not None:
            m.boundary_generator = m.generator.get_state()
        if m.step % m.train.log_every == 0 or m.step >= m.train.max_steps:
            self._check(m)  # one host sync per logging window, as a single trial does
        if m.status == "running" and m.step >= m.train.max_steps:
            m.status = "completed"

    def _check(self, m: Member, flush: bool = False) -> None:
        """The losses of the steps since the last check reach the host (one sync): any non-finite one
        ends the member (nan). The history gets one entry per train.log_every window, [last step,
        mean loss, its learning rate], at multiples of log_every and at max_steps; `flush` (an
        evaluation) ends the window in progress there too. A checkpoint keeps a window in progress
        (`window`), so a trial stopped and continued logs the steps an uninterrupted one does."""
        if m.unchecked:
            values = torch.stack([loss for _, loss, _ in m.unchecked]).tolist()
            if any(v != v or v in (float("inf"), float("-inf")) for v in values):
                m.status = "nan"
            m.window += [[step, value, lr] for (step, _, lr), value in zip(m.unchecked, values)]
            m.unchecked = []
        every, done = max(1, m.train.log_every), []
        for entry in m.window:
            done.append(entry)
            if entry[0] % every == 0 or entry[0] >= m.train.max_steps or (flush and entry is m.window[-1]):
                m.history.append([entry[0], sum(e[1] for e in done) / len(done), entry[2]])
                done = []
        m.window = done

    def forward_backward(self, rows: dict[int, list[int]], loss_tokens: dict[int, int]) -> dict[int, Any]:
        """One forward of every member's training rows together, and backward of
        sum over members m of (reply-token CE summed over m's rows) / loss_tokens[m].
        Returns {slot: that member's term, detached}."""
        sums, _ = self._summed_losses(self.train_ds, rows, grad=True)
        total = sum(sums[s] / max(loss_tokens[s], 1) for s in rows)
        try:
            total.backward()
        finally:
            self.split.segments = ()
        return {s: (sums[s] / max(loss_tokens[s], 1)).detach() for s in rows}

    def train_width(self, longest: int) -> int:
        """The width a training forward's rows are padded to: on CUDA, max_seq_len when its longest
        row is within an eighth of it (packed rows: the padding costs at most that); else the longest.
        One width for packed rows keeps the compiled layers' shapes static (no recompiles as the
        longest row changes) and makes each member's dropout mask, drawn over max_seq_len positions
        a row (multi_lora), contiguous: as a strided view its multiply was the largest eager kernel
        of an 8-member 1B step (bench/BENCH.md, issue 30)."""
        return self.max_seq_len if self.device.type == "cuda" and 8 * longest >= 7 * self.max_seq_len else longest

    def _summed_losses(self, ds: Any, rows: dict[int, list[int]], grad: bool) -> tuple[dict[int, Any], dict[int, int]]:
        """({slot: sum of reply-token CE over its rows}, {slot: its reply tokens})."""
        from trainable.data import collate
        from trainable.loss import decoder_and_head, loss_positions

        slots = list(rows)
        picked = ds[[i for s in slots for i in rows[s]]]
        batch = collate(picked, self.pad_id, self.train_width(max(len(x) for x in picked["input_ids"])) if grad else 0)
        width = batch["input_ids"].shape[1] - 1
        segments, index, targets, counts = [], [], [], []
        start = 0
        for s in slots:
            stop = start + len(rows[s])
            idx, tgt = loss_positions(batch["labels"][start:stop])
            index.append(idx + start * width)
            targets.append(tgt)
            counts.append(int(idx.numel()))
            segments.append((s, start, stop))
            start = stop
        decoder, lm_head, softcap = decoder_and_head(self.model)
        if self.whole is not None and self.whole.head is not None:
            lm_head = self.whole.head  # full: the member's trained copy (tied: its input embedding's)
        self.split.segments = tuple(segments)
        try:
            with torch.set_grad_enabled(grad):
                ids = batch["input_ids"].to(self.device, non_blocking=True)
                pos = batch["position_ids"].to(self.device, non_blocking=True)
                hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
                hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, torch.cat(index).to(self.device))
                heads = [self.tokens.head_rows(s) if self.tokens is not None else None for s in slots]
                sums = dict(zip(slots, self._member_sums(hidden, torch.cat(targets).to(self.device), lm_head, softcap, grad, counts, heads)))
        finally:
            if not grad:  # with grad, backward (recomputation under checkpointing) still needs the split
                self.split.segments = ()
        return sums, dict(zip(slots, counts))

    def _member_sums(self, hidden: Any, targets: Any, lm_head: Any, softcap: float | None, grad: bool, counts: list[int], heads: list[Any]) -> list[Any]:
        """Each member's sum of reply-token cross-entropy (fp32), computed as train.loss says
        (module docstring). `hidden`, `targets`: the reply positions of all members, in order;
        `counts`, `heads`: as for _token_losses."""
        if self.loss != "liger":
            per_token = self._token_losses(hidden, targets, lm_head, softcap, grad, counts, heads, chunked=self.loss == "chunked")
            return [piece.sum() for piece in torch.split(per_token, counts)]
        from trainable.fast import head_weight, liger_sum

        sums, start = [], 0
        for n, head in zip(counts, heads):
            h, t = hidden[start : start + n], targets[start : start + n]
            if n == 0:
                sums.append(hidden.new_zeros((), dtype=torch.float32))
            elif head is not None:  # new_tokens: its own lm_head columns, which the fused kernel cannot take
                sums.append(self._token_losses(h, t, lm_head, softcap, grad, [n], [head], chunked=True).sum())
            else:
                sums.append(liger_sum(head_weight(lm_head), h, t, softcap))
            start += n
        return sums

    def _token_losses(self, hidden: Any, targets: Any, lm_head: Any, softcap: float | None, grad: bool, counts: list[int], heads: list[Any],
                      chunked: bool = True) -> Any:  # fmt: skip
        """Per reply token cross-entropy (fp32) through lm_head. `chunked`: a chunk of tokens at a
        time (as trainable/loss.py does: each chunk's logits live only inside a checkpointed
        function); else all at once, not checkpointed (loss: model). `counts`: each member's
        tokens, in order; `heads`: each member's (token ids, rows) for the lm_head columns it trains
        (new_tokens), or None. Pieces end where a member's tokens end only when some member has
        its own columns."""
        from torch.utils.checkpoint import checkpoint

        spans = [(0, targets.shape[0], None)]
        if any(h is not None for h in heads):
            ends = [sum(counts[: i + 1]) for i in range(len(counts))]
            spans = [(end - n, end, head) for n, end, head in zip(counts, ends, heads)]
        pieces = []
        for lo, hi, head in spans:
            step = self.chunk_tokens if chunked else max(hi - lo, 1)
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                h, t = hidden[start:stop], targets[start:stop]
                args = (h, t, lm_head, softcap) + ((head[0], head[1]) if head is not None else ())
                pieces.append(checkpoint(_chunk_token_losses, *args, use_reentrant=False) if grad and chunked else _chunk_token_losses(*args))
        return torch.cat(pieces) if pieces else hidden.new_zeros((0,), dtype=torch.float32)

    # ------------------------------------------------------------------------------------------
    # eval and checkpoints

    def evaluate(self, slots: list[int] | None = None, batch_size: int | None = None) -> dict[int, float]:
        """Token-weighted mean eval loss of each member (all of them in one forward per eval batch)."""
        slots = list(self.members) if slots is None else slots
        batch_size = batch_size or self.eval_batch_size
        totals = {s: torch.zeros((), device=self.device, dtype=torch.float64) for s in slots}
        counts = dict.fromkeys(slots, 0)
        self.model.eval()
        try:
            for start in range(0, len(self.eval_ds), batch_size):
                idx = list(range(start, min(start + batch_size, len(self.eval_ds))))
                sums, n = self._summed_losses(self.eval_ds, {s: idx for s in slots}, grad=False)
                for s in slots:
                    if n[s]:
                        totals[s] += sums[s].double()
                        counts[s] += n[s]
        finally:
            self.model.train()
        return {s: float(totals[s]) / max(counts[s], 1) for s in slots}

    def save(self, slot: int, folder: str | Path) -> None:
        """The member as of its last optimizer step: adapter, optimizer, schedule, dropout generator,
        data position and history (an accumulation in progress is not kept; it is redone). A full
        member's embedding copy is kept once, in the PEFT file (restore reads it from there)."""
        m = self.members[slot]
        self._check(m)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        adapter = {f"{n}.{k}": getattr(lora, k).detach().cpu() for n, lora in m.layers.items() for k in ("lora_A", "lora_B")}
        adapter.update({f"token_rows.{k}": p.detach().cpu() for k, p in m.token_rows.items()})
        torch.save(adapter, folder / "adapter.pt")
        self._save_peft(m, adapter, folder)
        torch.save({"optimizer": m.optimizer.state_dict(), "schedule": m.schedule.state_dict(), "generator": m.boundary_generator}, folder / "optimizer.pt")
        state = {"name": m.name, "train": m.train.model_dump(mode="json"), "step": m.step, "rows_done": m.rows_done,
                 "tokens": m.tokens, "loss_tokens": m.loss_tokens, "status": m.status, "history": m.history, "window": m.window}  # fmt: skip
        (folder / "member.json").write_text(json.dumps(state))

    def _save_peft(self, m: Member, adapter: dict[str, torch.Tensor], folder: Path) -> None:
        """The member's adapter as PEFT saves a LoRA trial's (adapter_config.json and
        adapter_model.safetensors: PeftModel.from_pretrained loads it onto the base model), so that
        `best --export` and plain PEFT treat a cohort member like any trial."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        # base_model_name_or_path: the hub id, or the folder of a local (or the offline tiny) model,
        # so that AutoPeftModelForCausalLM finds the base
        from trainable.model import embedding_config, lora_target_pattern, resolve_model_path

        t = m.train
        extra: dict[str, Any] = {}
        if self.tokens is not None:
            extra = {"trainable_token_indices": self.tokens.peft_indices()}
        if self.whole is not None:
            extra = embedding_config(self.model, "full", [])  # the lone trial's modules_to_save (and tie), word for word
        config = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=lora_target_pattern(self.model, t.target_modules),
                            bias="none", task_type="CAUSAL_LM", base_model_name_or_path=resolve_model_path(self.model_id), revision=self.revision, **extra)  # fmt: skip
        config.save_pretrained(str(folder))
        # PEFT's keys: the module path under base_model.model, the adapter name dropped
        tensors = {f"base_model.model.{key.rsplit('.', 1)[0]}.{key.rsplit('.', 1)[1]}.weight": value.contiguous()
                   for key, value in adapter.items() if not key.startswith("token_rows.")}  # fmt: skip
        if self.tokens is not None:
            tensors.update({f"base_model.model.{self.tokens.paths[k]}.token_adapter.trainable_tokens_delta": adapter[f"token_rows.{k}"].contiguous() for k in m.token_rows})
        if self.whole is not None:
            # modules_to_save: the whole module's weight under its own path. PEFT writes (and, on
            # load, wants) both keys of a tied pair; safetensors keeps no shared storage, hence the clone.
            embed = m.embedding["embed"].detach().cpu()
            tensors[f"base_model.model.{self.whole.paths['embed']}.weight"] = embed.contiguous()
            head = m.embedding["head"].detach().cpu() if "head" in m.embedding else embed.clone()
            tensors[f"base_model.model.{self.whole.paths['head']}.weight"] = head.contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    def restore(self, folder: str | Path, slot: int | None = None) -> int:
        """A member saved by save(), into `slot` or the first free one; it continues where it was."""
        folder = Path(folder)
        state = json.loads((folder / "member.json").read_text())
        slot = self.add(TrainSection(**state["train"]), name=state["name"], slot=slot)
        m = self.members[slot]
        adapter = torch.load(folder / "adapter.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, lora in m.layers.items():
                lora.lora_A.copy_(adapter[f"{n}.lora_A"])
                lora.lora_B.copy_(adapter[f"{n}.lora_B"])
            for k, p in m.token_rows.items():
                p.copy_(adapter[f"token_rows.{k}"])
            if m.embedding:
                from safetensors.torch import load_file

                saved = load_file(str(folder / "adapter_model.safetensors"))
                for k, p in m.embedding.items():
                    p.copy_(saved[f"base_model.model.{self.whole.paths[k]}.weight"])
        refresh_all(list(m.layers.values()))
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        m.optimizer.load_state_dict(opt["optimizer"])
        m.schedule.load_state_dict(opt["schedule"])
        if m.generator is not None and opt["generator"] is not None:
            m.generator.set_state(opt["generator"])
            m.boundary_generator = opt["generator"]
        for key in ("step", "rows_done", "tokens", "loss_tokens", "status", "history"):
            setattr(m, key, state[key])
        m.window = state.get("window", [])  # the log_every window in progress when it was saved
        self._seek(m)
        return slot


class TokenRows:
    """new_tokens in a cohort: each member's own rows of the template tokens (PEFT's TrainableTokens
    for a trial alone), in the input embedding and, through the tie, in lm_head's columns.

    The frozen embedding is wrapped (`_RowsEmbedding`): a member's rows of the batch take its own
    rows at those token positions (scaled as Gemma scales embeddings); the cohort's loss puts each
    member's rows into its tokens' logits (`head_rows`). An untied lm_head gets rows of its own per
    member, initialised from its weight, as PEFT does. The base weights are never copied."""

    def __init__(self, model: Any, split: RowSplit, template_ids: list[int], device: Any):
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        self.paths = {"embed": _path_of(model, embed)}
        config = model.config.get_text_config()
        self.tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False)) or head.weight is embed.weight
        if not self.tied:
            self.paths["head"] = _path_of(model, head)
        self.embed_weight, self.head_weight = embed.weight, head.weight
        self.index = torch.as_tensor(template_ids, dtype=torch.long, device=device)
        self.rows: dict[int, dict[str, torch.nn.Parameter]] = {}
        parent, _, leaf = self.paths["embed"].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, _RowsEmbedding(embed, split, self))

    def new_rows(self, slot: int) -> dict[str, torch.nn.Parameter]:
        """A member's rows, starting from the base's (fp32, what the optimizer steps)."""
        rows = {"embed": torch.nn.Parameter(self.embed_weight.detach()[self.index].float().clone())}
        if not self.tied:
            rows["head"] = torch.nn.Parameter(self.head_weight.detach()[self.index].float().clone())
        self.rows[slot] = rows
        return rows

    def drop(self, slot: int) -> None:
        self.rows.pop(slot, None)

    def head_rows(self, slot: int) -> tuple[Any, Any] | None:
        rows = self.rows.get(slot)
        return None if rows is None else (self.index, rows.get("head", rows["embed"]))

    def peft_indices(self) -> dict[str, list[int]]:
        ids = self.index.tolist()
        return {path.rsplit(".", 1)[-1]: ids for path in self.paths.values()}


class _RowsEmbedding(torch.nn.Module):
    """The frozen input embedding with each member's own rows at the template tokens of its rows."""

    def __init__(self, base: Any, split: RowSplit, tokens: TokenRows):
        super().__init__()
        self.base, self.split, self.tokens = base, split, tokens
        lookup = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=base.weight.device)
        lookup[tokens.index] = torch.arange(len(tokens.index), device=base.weight.device)
        self.register_buffer("lookup", lookup, persistent=False)

    @property
    def weight(self) -> Any:
        return self.base.weight

    def forward(self, ids: Any) -> Any:
        import torch.nn.functional as F

        out = self.base(ids)
        segments = [(s, a, b) for s, a, b in self.split.segments if s in self.tokens.rows]
        if not segments:
            return out
        scale = getattr(self.base, "embed_scale", None)
        pieces, covered = [], 0
        for slot, start, stop in segments:
            if covered < start:
                pieces.append(out[covered:start])
            pos = self.lookup[ids[start:stop]]
            trained = F.embedding(pos.clamp(min=0), self.tokens.rows[slot]["embed"].to(out.dtype))
            if scale is not None:
                trained = trained * scale.to(trained.dtype)
            pieces.append(torch.where((pos >= 0).unsqueeze(-1), trained, out[start:stop]))
            covered = stop
        if covered < out.shape[0]:
            pieces.append(out[covered:])
        return torch.cat(pieces)


class WholeEmbedding:
    """embeddings: full in a cohort (of one member at a time): the member trains a copy of the whole
    input embedding, and lm_head through Gemma's tie, as PEFT's modules_to_save (with
    ensure_weight_tying) does for a trial alone: a deep copy of the embedding module, in the base's
    dtype as PEFT leaves it, swapped into the model while the member is in; an untied lm_head gets
    its own copy. The base's modules are never written to: `detach` puts the original back."""

    def __init__(self, model: Any):
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        self.model = model
        self.paths = {"embed": _path_of(model, embed), "head": _path_of(model, head)}
        config = model.config.get_text_config()
        self.tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False)) or head.weight is embed.weight
        self.embed, self.base_head = embed, head
        self.head: Any = None  # the lm_head the loss multiplies by while a member is in (None: the base's)

    def attach(self, slot: int) -> dict[str, torch.nn.Parameter]:
        """The member's trainable copies ("embed", and "head" if untied), starting from the base's."""
        import copy

        if self.head is not None:
            raise ValueError(f"model.embeddings: full: slot {slot} cannot join; a full member trains the whole embedding matrix and runs alone")
        embed = copy.deepcopy(self.embed)
        embed.weight.requires_grad_(True)
        self._swap(self.paths["embed"], embed)
        params = {"embed": embed.weight}
        if self.tied:  # one trained matrix serves both ends, as ensure_weight_tying has it
            self.head = torch.nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False, device="meta")
            self.head.weight = embed.weight
        else:
            self.head = copy.deepcopy(self.base_head)
            self.head.weight.requires_grad_(True)
            params["head"] = self.head.weight
        return params

    def detach(self) -> None:
        self._swap(self.paths["embed"], self.embed)
        self.head = None

    def _swap(self, path: str, module: Any) -> None:
        parent, _, leaf = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, module)


def _path_of(model: Any, target: Any) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _chunk_token_losses(hidden: Any, targets: Any, lm_head: Any, softcap: float | None, columns: Any = None, rows: Any = None) -> Any:
    import torch.nn.functional as F

    logits = lm_head(hidden)
    if columns is not None:  # new_tokens: this member's own rows for these vocabulary columns (PEFT's TrainableTokens)
        logits = logits.index_copy(-1, columns, F.linear(hidden, rows.to(hidden.dtype)).to(logits.dtype))
    logits = logits.float()
    if softcap:
        logits = (logits / softcap).tanh() * softcap
    return F.cross_entropy(logits, targets, reduction="none")
