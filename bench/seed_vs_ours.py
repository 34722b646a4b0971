"""The seed's training recipe, HF Trainer tuned and our trainable, side by side (issues 4, 16, 30).

    # two GPUs, one size each, at the same time (~8 min for 1B, ~9 min for 12B on H200s):
    CUDA_VISIBLE_DEVICES=0 python bench/seed_vs_ours.py --sizes 1b --out 1b.json &
    CUDA_VISIBLE_DEVICES=1 python bench/seed_vs_ours.py --sizes 12b --out 12b.json &
    python bench/seed_vs_ours.py --dry-run --out /tmp/dry.json      # CPU, tiny model: every code path

Rows run in order of importance (seed, HF Trainer tuned, ours, ours fast, then one switch at a
time, the 50-loss check, then the larger micro-batches, each with its HF Trainer tuned anchor) and
the JSON is rewritten after every row, so a run cut short keeps what finished. Each row's label
names every setting (optimizer included); rows that cannot run here (liger-kernel without CUDA:
every HF Trainer tuned row on a CPU) are recorded as skipped, with the reason.

Time budget (--budget-s, per size): a row starts only if the budget has room for its expected
duration (expected_seconds); a row still running at the limit is stopped and recorded as `skipped`
with reason `time budget: ...` and the --start-row that resumes there, never as an error. A row
that fails records the exception's last lines (the child writes them), not the stderr tail
(progress bars). The `[liger unavailable]` fallback (the all-switches row measured with the
chunked loss instead) happens only when liger-kernel cannot be imported for our own loss; a
failing HF Trainer + liger row is an error of that row alone. --only takes labels separated by `|`
(labels contain commas): `--only "LoRA bf16, chunked loss|mb 16x2"` (every row of a micro-batch,
its HF Trainer tuned anchor included, contains "mb 16x2").

HF Trainer tuned, the anchor of every "x HF" ratio: Hugging Face Trainer + PEFT with the seed's
LoRA and the settings a user tuning HF Trainer for speed would pick, at the micro-batch of the
"ours" row it is compared with (one anchor per micro-batch an ours row uses): sdpa, no gradient
checkpointing (retried with it on OOM), use_liger_kernel=True, bf16 adapters (PEFT's
get_peft_model(..., autocast_adapter_dtype=False)), torch's fused AdamW (adamw_torch_fused), frozen
embeddings, packed rows with position_ids (as DataCollatorWithFlattening feeds them),
logging_nan_inf_filter=False and one log at the end (no per-step host sync). Beside it at the main
micro-batches, the same with torch_compile=True; the anchor of a micro-batch is the faster of the
two in the same run (`comparisons` names it). Where torch_compile does not compile the whole step
(liger's Triton kernels run outside the graph) the row's `graph_breaks` says so.
Timing, every row alike: the tokens trained in the timed steps (counted: non-padding tokens)
over the wall time from the end of the last warm-up step to the end of the last timed step, with
one device sync at each end.

The 50-loss check (1B): our first 50 losses (fp32 LoRA; bf16 LoRA; liger loss where it runs)
against HF Trainer + PEFT on the same micro-batches, same init, bf16 on the GPU.

The seed recipe, exactly as written: Hugging Face Trainer + PEFT LoRA (r=16, alpha=16, dropout 0.05,
q/k/v/o/gate/up/down) + modules_to_save=['embed_tokens', 'lm_head'] + paged_adamw_8bit + gradient
checkpointing + micro-batch 1 x 32 accumulation, eager attention, bf16; QLoRA adds NF4 with double
quantization and bf16 compute. Ours: a cohort of one (trainable.cohort: how every trial trains),
first with the seed's settings, then
with one switch more at a time (sdpa, new_tokens embeddings, chunked loss, a large micro-batch with
checkpointing only if needed), so each switch is measured. Every run: random-weight real
architecture (bench/realsize.py), seq 1024 packed rows, 32 sequences per optimizer step, --warmup
untimed steps then --timed timed steps (per row: long mb-1 steps 1 + 2, 1B fast rows 2 + 10,
12B rows 1 + 3; --warmup/--timed override all), in its own process (clean CUDA peak statistics).

MFU, per token: 4 x (decoder linear params) [frozen weights: forward + input gradient]
+ 6 x layers x seq x heads x head_dim [causal attention, QK^T and AV, forward + backward]
+ (4 or 6) x vocab x hidden x f [lm_head: 6 when its weight trains (the seed's modules_to_save),
4 when frozen; f = fraction of tokens that go through it: 1 for HF Trainer (liger's fused loss
too computes lm_head at every position), the reply-token fraction for our chunked and liger
losses]; LoRA's own FLOPs and recomputation are not counted. Divided by the dense bf16 peak of an
H200 (an H100 SXM's is the same), 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from realsize import ARCH, build_checkpoint, prepare_data  # noqa: E402

PEAK_FLOPS = 989e12  # H200 SXM dense bf16
# Seconds per size on an H200, so both sizes fit one 10-minute command on two GPUs; rows past it are
# recorded as skipped (finish them with --start-row). From the 2026-11-30 run: a row costs ~20-30 s
# of process start, load and eval besides its steps; 1B fast steps ~1.5 s, seed steps ~15 s;
# 12B QLoRA steps ~10 s, seed steps ~36 s; a compiled row adds ~50 s; building 12B ~90 s.
BUDGET_S = {"1b": 470, "4b": 500, "12b": 540}


def expected_seconds(row: dict, size: str) -> float:
    """A row's wall time on an H200 (process start to result), from the 2026-11-30 rows: 1B fast rows
    31-40 s, compiled 82 s, the 50-loss check 122 s, seed 55 s; 12B rows 53-56 s, checkpointed
    micro-batch 2 93 s, seed 117 s. A row starts only if its size's budget has this much left."""
    if row["kind"] == "losses":
        return 125.0
    s = row.get("recipe") or row["settings"]
    seconds = {"1b": 35.0, "4b": 45.0, "12b": 55.0}.get(size, 55.0)
    if s["batch"][0] == 1:
        seconds = {"1b": 60.0, "4b": 80.0, "12b": 120.0}.get(size, 120.0)
    elif s.get("ckpt", s.get("gradient_checkpointing")) is True and size != "1b":
        seconds = 95.0
    if s.get("compile") or s.get("attn_implementation") == "flex_attention":
        seconds += 50.0  # torch.compile / flex_attention's kernels, built in the row's warm-up step
    return seconds


def readable(text: str, lines: int = 20) -> str:
    """The informative end of a child's stderr: progress bars (carriage returns, tqdm, 'Loading
    weights') dropped; from the last traceback on when there is one."""
    noise = ("Loading weights", "it/s]", "s/it]", "%|", "Saving the dataset", "Map:", "warnings.warn(")
    kept = [ln.rstrip() for ln in text.replace("\r", "\n").split("\n") if ln.strip() and not any(n in ln for n in noise)]
    starts = [i for i, ln in enumerate(kept) if ln.startswith("Traceback")]
    if starts:
        kept = kept[starts[-1] :]
        return "\n".join(kept[:3] + (["  ..."] if len(kept) > lines else []) + kept[3:][-(lines - 3) :])
    return "\n".join(kept[-lines:])


def exception_text(exc: BaseException, frames: int = 6) -> str:
    """`Type: message` (long messages cut in the middle) and the innermost frames, for the JSON."""
    import traceback

    message = str(exc)
    if len(message) > 1500:
        message = message[:700] + " [...] " + message[-700:]
    stack = traceback.extract_tb(exc.__traceback__)[-frames:]
    where = "".join(f"  {f.filename}:{f.lineno} in {f.name}\n" for f in stack)
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {message}\n{where}" + (f"caused by {type(cause).__name__}: {str(cause)[:500]}" if cause else "")
SEQ = 1024
SEQS_PER_STEP = 32
SEED_TARGETS = ["k_proj", "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def hf_recipe(micro: int, **changes) -> dict:
    """HF Trainer tuned at micro-batch `micro` (the anchor of the ours rows at that micro-batch), with `changes`."""
    base = dict(batch=(micro, SEQS_PER_STEP // micro), attn="sdpa", ckpt=False, optim="adamw_torch_fused", embeddings="frozen", liger=True,
                packed=True, lora_dtype="bfloat16", compile=False)  # fmt: skip
    return {**base, **changes}


SEED_RECIPE = dict(batch=(1, 32), attn="eager", ckpt=True, optim="paged_adamw_8bit", embeddings="full", liger=False, packed=False,
                   lora_dtype="float32", compile=False)  # fmt: skip


def ours_settings(size: str, **changes) -> dict:
    """Our base row: the same split and attention as HF Trainer tuned, our loop and chunked loss, fp32 LoRA."""
    micro = 8 if size == "1b" else 4
    base = dict(batch=(micro, SEQS_PER_STEP // micro), attn_implementation="sdpa", gradient_checkpointing=False, loss="chunked",
                optimizer="adamw", lora_dtype="float32", compile=False, embeddings="frozen")  # fmt: skip
    return {**base, **changes}


def label(kind: str, s: dict) -> str:
    """Every setting of a row, named (so two rows' labels show all that differs)."""
    if kind in ("seed", "hf"):
        name = "seed (HF Trainer)" if s == SEED_RECIPE else "HF Trainer tuned"
        return (f"{name}: mb {s['batch'][0]}x{s['batch'][1]}, {s['attn']}, ckpt {'on' if s['ckpt'] else 'off'}, {s['optim']}, "
                f"emb {s['embeddings']}, LoRA {'bf16' if s['lora_dtype'] == 'bfloat16' else 'fp32'}, {'liger' if s['liger'] else 'model'} loss, "
                f"{'packed' if s['packed'] else 'no position_ids'}{', torch_compile' if s['compile'] else ''}")  # fmt: skip
    ckpt = {True: "on", False: "off"}.get(s["gradient_checkpointing"], s["gradient_checkpointing"])
    optim = {"adamw": "torch fused AdamW"}.get(s["optimizer"], s["optimizer"])
    return (f"ours: mb {s['batch'][0]}x{s['batch'][1]}, {s['attn_implementation']}, ckpt {ckpt}, {optim}, emb {s['embeddings']}, "
            f"LoRA {'bf16' if s['lora_dtype'] == 'bfloat16' else 'fp32'}, {s['loss']} loss{', compiled layers' if s['compile'] else ''}")  # fmt: skip


def rows_for(size: str, ablations: bool) -> list[dict]:
    """The rows of one size, most important first. warmup/timed: steps before / while timing. Every
    micro-batch an ours row uses gets its HF Trainer tuned anchor just before the first ours row
    there (with_anchors); the main micro-batches also get the anchor with torch_compile."""
    slow, fast = (1, 2), ((2, 10) if size == "1b" else (1, 3))
    o = lambda **c: ours_settings(size, **c)  # noqa: E731
    hf_compiled = lambda micro: dict(kind="hf", recipe=hf_recipe(micro, compile=True), steps=(fast[0] + 1, fast[1]))  # noqa: E731
    fast_all = dict(lora_dtype="bfloat16", loss="liger", compile=size == "1b")  # 12B QLoRA: compile is its own row (bnb 4-bit ops)
    micro = 8 if size == "1b" else 4
    rows = [
        dict(kind="seed", recipe=SEED_RECIPE, steps=slow),
        dict(kind="ours", settings=o(), steps=fast),
        dict(kind="ours", settings=o(**fast_all), steps=(fast[0] + int(fast_all["compile"]), fast[1])),
    ]
    if size == "1b":
        rows.append(dict(kind="losses"))
    if size != "1b":  # the memory target: <= 0.6x the seed's peak allocated at >= 3x its tokens/s
        # micro-batch 2, then 4 (half the per-token cost of dequantizing the NF4 weights), then 4 with
        # bnb's 8-bit AdamW (less optimizer state) and compiled layers: bench/BENCH.md, "Seed recipe vs
        # HF Trainer's best vs ours on H200s" and "Cohorts with folding, two GPUs, ..." (third session)
        rows.append(dict(kind="ours", settings=o(batch=(2, 16), gradient_checkpointing=True, lora_dtype="bfloat16", loss="liger"), steps=fast))
        rows.append(dict(kind="ours", settings=o(batch=(4, 8), gradient_checkpointing=True, lora_dtype="bfloat16", loss="liger"), steps=fast))
        rows.append(dict(kind="ours", settings=o(batch=(4, 8), gradient_checkpointing=True, lora_dtype="bfloat16", loss="liger", optimizer="adamw_8bit",
                                                 compile=True), steps=(fast[0] + 1, fast[1])))  # fmt: skip
    rows += [
        hf_compiled(micro),
        dict(kind="ours", settings=o(lora_dtype="bfloat16"), steps=fast),
        dict(kind="ours", settings=o(loss="liger"), steps=fast),
        dict(kind="ours", settings=o(compile=True), steps=(fast[0] + 1, fast[1])),
    ]
    if size == "1b":
        rows += [
            dict(kind="ours", settings=o(attn_implementation="flex_attention"), steps=(fast[0] + 1, fast[1])),
            dict(kind="ours", settings=o(batch=(16, 2), **fast_all), steps=(fast[0] + 1, fast[1])),
            hf_compiled(16),
            # micro-batch 32 (one micro-batch per step) for the MFU target
            dict(kind="ours", settings=o(batch=(32, 1), **fast_all), steps=(fast[0] + 1, fast[1])),
            hf_compiled(32),
            # flex_attention skips the blocks the packed rows' document mask removes (sdpa's share of the
            # step: bench/BENCH.md, "One H200: micro-batch 32, where the GPU time goes, ...")
            dict(kind="ours", settings=o(batch=(32, 1), attn_implementation="flex_attention", **fast_all), steps=(fast[0] + 1, fast[1])),
            dict(kind="ours", settings=o(batch=(1, 32), **fast_all), steps=(2, 3)),
            dict(kind="ours", settings=dict(batch=(1, 32), attn_implementation="eager", gradient_checkpointing=True, loss="model", optimizer="paged_adamw_8bit",
                                            lora_dtype="float32", compile=False, embeddings="full"), steps=slow),  # fmt: skip
        ]
    else:
        rows += [
            dict(kind="ours", settings=o(compile=True, lora_dtype="bfloat16", loss="liger"), steps=(fast[0] + 1, fast[1])),
            dict(kind="ours", settings=o(batch=(2, 16), gradient_checkpointing=True, lora_dtype="bfloat16"), steps=fast),
            # micro-batch 8: each NF4 weight is dequantized once per micro-batch (forward and backward),
            # so twice the tokens per dequantization
            dict(kind="ours", settings=o(batch=(8, 4), compile=True, lora_dtype="bfloat16", loss="liger"), steps=(fast[0] + 1, fast[1])),
            hf_compiled(8),
        ]
    if ablations:  # the issue-4 ladder at micro-batch 1, one switch more at a time
        ladder = dict(batch=(1, 32), attn_implementation="eager", gradient_checkpointing=True, loss="model", optimizer="paged_adamw_8bit",
                      lora_dtype="float32", compile=False, embeddings="full")  # fmt: skip
        for change in (dict(attn_implementation="sdpa"), dict(embeddings="new_tokens"), dict(loss="chunked")):
            ladder = {**ladder, **change}
            rows.append(dict(kind="ours", settings=dict(ladder), steps=(1, 3)))
    rows = with_anchors(rows, fast)
    for r in rows:
        r["name"] = "50-loss check: ours vs HF Trainer + PEFT" if r["kind"] == "losses" else label(r["kind"], r.get("recipe") or r["settings"])
    return rows


def with_anchors(rows: list[dict], steps: tuple[int, int]) -> list[dict]:
    """`rows` with an HF Trainer tuned row (no torch_compile) just before the first ours row of each
    micro-batch that has none earlier: every ours row has its anchor at its own micro-batch."""
    out: list[dict] = []
    anchored: set[int] = set()
    for row in rows:
        if row["kind"] == "hf" and not row["recipe"]["compile"]:
            anchored.add(row["recipe"]["batch"][0])
        if row["kind"] == "ours" and row["settings"]["batch"][0] not in anchored:
            micro = row["settings"]["batch"][0]
            out.append(dict(kind="hf", recipe=hf_recipe(micro), steps=(2, 3) if micro == 1 else steps))
            anchored.add(micro)
        out.append(row)
    return out


def flops_per_token(size: str, lm_head_fraction: float, head_trains: bool) -> float:
    a = ARCH[size]
    h, layers, inter = a["hidden_size"], a["num_hidden_layers"], a["intermediate_size"]
    q, kv = a["num_attention_heads"] * a["head_dim"], a["num_key_value_heads"] * a["head_dim"]
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    attention = 6 * layers * SEQ * q
    head = (6 if head_trains else 4) * a["vocab_size"] * h * lm_head_fraction
    return 4 * linear + attention + head


# ----------------------------------------------------------------------------------------------
# one run (each in its own process)


def micro_batches(data_dir: str, micro: int, steps: int) -> list[dict]:
    from trainable.data import load_split, train_batches

    stream = train_batches(load_split(data_dir, "train"), micro, seed=0, start_micro_batch=0, pad_id=0)
    return [next(stream) for _ in range(steps * SEQS_PER_STEP // micro)]


def hf_run(model_dir: str, data_dir: str, method: str, recipe: dict, warmup: int, timed: int) -> dict:
    """HF Trainer + PEFT with the seed's LoRA under `recipe`: the tokens of the timed steps (counted,
    non-padding) over the wall time from the end of the last warm-up step to the end of the last
    timed step, with a device sync at each end (StepWindow)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict = {"dtype": dtype, "attn_implementation": recipe["attn"]}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)  # fmt: skip
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method != "qlora" and cuda:
        model.to("cuda")
    extra = {"modules_to_save": ["embed_tokens", "lm_head"]} if recipe["embeddings"] == "full" else {}
    config = LoraConfig(lora_alpha=16, lora_dropout=0.05, r=16, bias="none", task_type="CAUSAL_LM", target_modules=SEED_TARGETS, **extra)
    adapters_bf16 = recipe["lora_dtype"] == "bfloat16"
    # autocast_adapter_dtype=False: PEFT leaves the adapters in the dtype they were made in instead of
    # upcasting them to fp32; on 4-bit layers they are made in fp32, so they are cast here, once
    model = get_peft_model(model, config, autocast_adapter_dtype=not adapters_bf16)
    if adapters_bf16:
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" in name:
                param.data = param.data.to(dtype)
    load_seconds = time.perf_counter() - started
    micro, accum = recipe["batch"]
    steps = warmup + timed
    batches = micro_batches(data_dir, micro, steps)
    step_tokens = [sum(b["tokens"] for b in batches[i * accum : (i + 1) * accum]) for i in range(steps)]
    keys = ("input_ids", "labels", "position_ids") if recipe["packed"] else ("input_ids", "labels")

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):  # the seed knows nothing of packing: plain causal attention over each row
            for b in batches:
                for i in range(micro):
                    yield {k: b[k][i] for k in keys}

    window = StepWindow(warmup, timed, torch.cuda.synchronize if cuda else None)
    optim = recipe["optim"] if cuda else "adamw_torch"  # bitsandbytes' paged optimizer needs CUDA
    tuned = recipe != SEED_RECIPE
    args = TrainingArguments(
        output_dir="/tmp/hf-run", per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        bf16=cuda, gradient_checkpointing=recipe["ckpt"], optim=optim, use_liger_kernel=recipe["liger"], torch_compile=recipe["compile"],
        gradient_checkpointing_kwargs=None if not tuned or not recipe["ckpt"] else {"use_reentrant": False},
        # tuned: no per-step NaN/Inf check and one log at the end (each log reads the loss: a host sync)
        logging_nan_inf_filter=not tuned, logging_steps=steps if tuned else 1,
        learning_rate=2e-4, max_steps=steps, save_strategy="no", report_to=[], use_cpu=not cuda,
        remove_unused_columns=False, disable_tqdm=True, dataloader_pin_memory=cuda,
    )  # fmt: skip
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate, callbacks=[window.callback()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if window.seconds is None:
        raise RuntimeError(f"HF Trainer ran {window.steps} optimizer steps, fewer than {warmup} warm-up + {timed} timed: no timed window")
    tokens = sum(step_tokens[warmup:])
    out = {"tokens_per_sec": tokens / window.seconds, "tokens": tokens, "train_seconds": window.seconds, "load_seconds": load_seconds,
           "trial_status": "completed", "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "lm_head_fraction": 1.0,
           "head_trains": recipe["embeddings"] == "full", "optimizer": optim, "recipe": recipe,
           "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad and "lora_" in n})}  # fmt: skip
    if recipe["compile"]:
        out["dynamo_counters"] = dynamo_counters()
        out["graph_breaks"] = sum(out["dynamo_counters"].get("graph_break", {}).values())
    if cuda:
        out.update(peak_vram_gb=torch.cuda.max_memory_allocated() / 2**30, peak_vram_reserved_gb=torch.cuda.max_memory_reserved() / 2**30)
    return out


class StepWindow:
    """The wall time of optimizer steps warmup+1 .. warmup+timed of an HF Trainer run: from the end of
    the last warm-up step (the start of the first timed one, its batch's loading included) to the
    end of the last timed step, with `sync` (the device's) at both ends and nowhere else. With no
    warm-up it starts at the first step's beginning."""

    def __init__(self, warmup: int, timed: int, sync=None, clock=time.perf_counter) -> None:
        self.warmup, self.timed, self.sync, self.clock = warmup, timed, sync, clock
        self.steps = 0
        self.started: float | None = None
        self.seconds: float | None = None

    def _mark(self) -> float:
        if self.sync is not None:
            self.sync()
        return self.clock()

    def step_begin(self) -> None:
        if self.warmup == 0 and self.steps == 0:
            self.started = self._mark()

    def step_end(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.started = self._mark()
        elif self.steps == self.warmup + self.timed and self.started is not None:
            self.seconds = self._mark() - self.started

    def callback(self):
        from transformers import TrainerCallback

        window = self

        class Window(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                window.step_begin()

            def on_step_end(self, args, state, control, **kw):
                window.step_end()

        return Window()


# the 50-loss check: the test in tests/unit/test_reference.py, at real size on the GPU
CHECK_STEPS, CHECK_MICRO, CHECK_ACCUM, CHECK_LR, CHECK_RTOL = 50, 2, 2, 1e-3, 2e-2


def check_train(**changes):
    from sweep.config import TrainSection

    return TrainSection(max_steps=CHECK_STEPS, eval_every=CHECK_STEPS, log_every=1, batch=(CHECK_MICRO, CHECK_ACCUM), learning_rate=CHECK_LR,
                        warmup_ratio=0.1, lr_scheduler="cosine", optimizer="adamw", weight_decay=0.0, max_grad_norm=1.0, lora_r=16, lora_alpha=16,
                        lora_dropout=0.0, target_modules="all-linear", gradient_checkpointing=False, seed=0, **changes)  # fmt: skip


def hf_losses(model_dir: str, data_dir: str, method: str) -> list[float]:
    """HF Trainer + PEFT fed our micro-batches in our order, with our adapter init and schedule."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from trainable.model import lora_target_pattern

    from realsize import load_frozen_base

    cuda = torch.cuda.is_available()
    model = load_frozen_base(model_dir, method)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=lora_target_pattern(model, "all-linear"), bias="none", task_type="CAUSAL_LM"))
    batches = micro_batches(data_dir, CHECK_MICRO, CHECK_STEPS * CHECK_ACCUM * CHECK_MICRO // SEQS_PER_STEP + 1)[: CHECK_STEPS * CHECK_ACCUM]

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            for b in batches:
                for i in range(CHECK_MICRO):
                    yield {k: b[k][i] for k in ("input_ids", "labels", "position_ids")}

    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    args = TrainingArguments(
        output_dir="/tmp/hf-losses", per_device_train_batch_size=CHECK_MICRO, gradient_accumulation_steps=CHECK_ACCUM,
        learning_rate=CHECK_LR, lr_scheduler_type="cosine", warmup_steps=int(round(0.1 * CHECK_STEPS)), max_steps=CHECK_STEPS, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch_fused" if cuda else "adamw_torch", logging_steps=1, report_to=[], save_strategy="no", use_cpu=not cuda,
        bf16=cuda, seed=0, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def losses_run(model_dir: str, data_dir: str, template_ids: list[int], method: str) -> dict:
    """Our first 50 losses (fp32 LoRA, bf16 LoRA, liger loss where it runs) against HF Trainer's."""
    import gc

    import torch

    from trainable.cohort import Cohort
    from trainable.fast import liger_unavailable

    variants = {"ours (fp32 LoRA, chunked loss)": check_train(lora_dtype="float32", loss="chunked"),
                "ours (bf16 LoRA, chunked loss)": check_train(lora_dtype="bfloat16", loss="chunked")}  # fmt: skip
    liger_reason = liger_unavailable()
    if liger_reason is None:
        variants["ours (bf16 LoRA, liger loss)"] = check_train(lora_dtype="bfloat16", loss="liger")
    if not torch.cuda.is_available():  # CPU: fp32 compute, so bf16 LoRA runs in fp32 too
        variants = dict(list(variants.items())[:1])
    out: dict = {"steps": CHECK_STEPS, "micro_batch": CHECK_MICRO, "grad_accum": CHECK_ACCUM, "learning_rate": CHECK_LR, "rtol": CHECK_RTOL, "losses": {}}
    if liger_reason:
        out["liger_skipped"] = liger_reason
    for name, train in variants.items():  # a cohort of one: how every trial trains
        c = Cohort(model_dir, data_dir, train.model_copy(update={"method": method, "compile": False}), max_seq_len=SEQ, max_rows=CHECK_MICRO,
                   embeddings="frozen", template_ids=tuple(template_ids), fold_tokens=0)  # fmt: skip
        slot = c.add(train.model_copy(update={"method": method}))
        while c.running():
            c.step()
        c.sync(slot)
        out["losses"][name] = c.members[slot].losses()
        del c
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    theirs = out["losses"]["HF Trainer + PEFT"] = hf_losses(model_dir, data_dir, method)
    out["max_rel_diff"] = {}
    for name, ours in out["losses"].items():
        if name.startswith("ours"):
            n = min(len(ours), len(theirs))
            out["max_rel_diff"][name] = max((abs(a - b) / max(abs(b), 1e-9) for a, b in zip(ours[:n], theirs[:n])), default=None)
            out.setdefault("within_tolerance", {})[name] = n == CHECK_STEPS and out["max_rel_diff"][name] is not None and out["max_rel_diff"][name] <= CHECK_RTOL
    out["trial_status"] = "completed"
    return out


def ours_run(model_dir: str, data_dir: str, template_ids: list[int], method: str, settings: dict, warmup: int, timed: int,
             profile: bool = False, lora_dropout: float = 0.05) -> dict:
    """A cohort of one member (how every trial trains): `warmup` untimed optimizer steps, then
    `timed` ones, timed from a device sync to a device sync after the last (its losses read). With
    `profile`, torch.profiler records the GPU's kernels over the timed steps and the result says
    where that time went."""
    import torch

    from sweep.config import TrainSection
    from trainable.cohort import Cohort
    from trainable.device import peak_memory

    settings = dict(settings)
    embeddings = settings.pop("embeddings")
    steps = warmup + timed
    train = TrainSection(method=method, lora_r=16, lora_alpha=16, lora_dropout=lora_dropout, target_modules="all-linear", learning_rate=2e-4,
                         max_steps=steps + 1, eval_every=steps + 1, log_every=steps + 1, lr_scheduler="constant", warmup_ratio=0.0, **settings)  # fmt: skip
    torch.set_num_threads(8)
    micro = train.batch[0]
    c = Cohort(model_dir, data_dir, train, max_seq_len=SEQ, max_rows=micro, eval_batch_size=micro, embeddings=embeddings, template_ids=tuple(template_ids))
    slot = c.add(train)
    m = c.members[slot]

    def optimizer_step() -> None:
        before = m.step
        while m.step == before:
            c.step()

    profiler = KernelProfile(0, timed) if profile else None
    step = profiler.around(optimizer_step) if profiler is not None else optimizer_step
    for _ in range(warmup):
        optimizer_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tick, tokens, loss_tokens = time.perf_counter(), m.tokens, m.loss_tokens
    for _ in range(timed):
        step()
    c.sync(slot)  # the losses reach the host: every step has run
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tick
    out = {"trial_status": "completed", "step": m.step, "train_loss": m.losses()[-1], "train_seconds": seconds,
           "tokens_per_sec": (m.tokens - tokens) / seconds, "loss_tokens_per_sec": (m.loss_tokens - loss_tokens) / seconds,
           **peak_memory(c.device), "trainable_params": sum(p.numel() for p in m.params), "gradient_checkpointing": c.checkpointing,
           "head_trains": embeddings == "full", "compiled_layers": c.compiled_layers, "loss": c.base_train.loss, "lora_dtype": c.base_train.lora_dtype}  # fmt: skip
    reply_only = settings["loss"] in ("chunked", "liger")  # only reply positions go through lm_head
    out["lm_head_fraction"] = out["loss_tokens_per_sec"] / out["tokens_per_sec"] if reply_only else 1.0
    if settings.get("compile"):
        out["dynamo_counters"] = dynamo_counters()
    if profiler is not None:
        out["profile"] = profiler.summary()
    return out


# kernel name -> what it computes; the first pattern that matches names the kernel's share
KERNEL_KINDS = [
    ("nf4 dequantize", r"dequant|kDequantize|kQuantize"),
    ("attention", r"flash|fmha|attention|attn"),
    ("gemm", r"gemm|cutlass|nvjet|cublas|sm\d+_xmma|matmul|_mm_|wgmma|^aten::(add)?b?mm$"),
    ("liger / triton (loss, compiled layers)", r"triton|liger"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copies and casts", r"copy|cast|convert|memcpy|memset|fill"),
    ("elementwise / reductions (eager)", r"elementwise|vectorized|reduce|softmax|norm|index|scatter|gather|cat"),
]


class KernelProfile:
    """torch.profiler over the timed optimizer steps (after `warmup`, `timed` of them):
    the sum of GPU kernel time by kind (GEMMs, NF4 dequantization, attention, Triton, optimizer,
    casts ...), the top kernels, and the window's wall time, so kernel time / wall time says how
    busy the GPU was. On CPU it profiles CPU ops."""

    def __init__(self, warmup: int, timed: int) -> None:
        self.warmup, self.timed = warmup, timed
        self.steps = 0
        self.prof = None
        self.started = 0.0
        self.window = 0.0

    def around(self, optimizer_step):
        def step(*args, **kwargs):
            if self.steps == self.warmup:
                self.start()
            out = optimizer_step(*args, **kwargs)
            self.steps += 1
            if self.steps == self.warmup + self.timed:
                self.finish()
            return out

        return step

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
        self.prof = profile(activities=[activity])
        self.prof.__enter__()
        self.started = time.perf_counter()

    def finish(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.window = time.perf_counter() - self.started
        self.prof.__exit__(None, None, None)

    def summary(self) -> dict:
        import re

        import torch

        if self.prof is None or not self.window:
            if self.prof is not None:  # started but the trial ended first: stop recording
                self.prof.__exit__(None, None, None)
            return {"error": f"the trial made {self.steps} optimizer steps, fewer than {self.warmup} + {self.timed}: no whole profile"}
        cuda = torch.cuda.is_available()
        kernels = []
        for e in self.prof.key_averages():
            seconds = e.self_device_time_total if cuda else e.self_cpu_time_total
            if seconds:
                kernels.append((e.key, seconds / 1e6, e.count))
        kernels.sort(key=lambda k: -k[1])
        total = sum(k[1] for k in kernels)
        kinds: dict[str, float] = {}
        for name, seconds, _ in kernels:
            kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE)), "other")
            kinds[kind] = kinds.get(kind, 0.0) + seconds
        return {
            "what": "GPU kernel time" if cuda else "CPU op self time",
            "window": f"the {self.timed} timed optimizer steps (after {self.warmup} warm-up steps), synchronised at both ends",
            "window_seconds": round(self.window, 3),
            "kernel_seconds": round(total, 3),
            "busy_fraction": round(total / self.window, 4),
            "by_kind_seconds": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "seconds": round(sec, 4), "count": c} for n, sec, c in kernels[:30]],
        }


def dynamo_counters() -> dict[str, dict[str, int]]:
    """torch._dynamo's counters after a compiled row (one row per process): frames and graphs
    captured, recompiles, graph breaks (`graph_break`), and inductor's matmul shapes (`aten_mm_info`:
    a symbolic size such as `8*s29` means the graph was compiled for varying shapes)."""
    from torch._dynamo.utils import counters

    return {group: {str(k): int(v) for k, v in c.items()} for group, c in counters.items() if c}


def liger_reason(row: dict) -> str | None:
    """Why this row's liger cannot run here (None: it can, or the row does not use liger): for our
    loss, liger-kernel not importable or no CUDA; for HF Trainer's use_liger_kernel, no CUDA or no
    liger-kernel. Checked in this process, once per row; a failure inside a row (HF Trainer's own
    liger patching) is that row's error, nothing more."""
    if (row.get("recipe") or {}).get("liger"):
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            return "HF Trainer's use_liger_kernel runs liger-kernel's Triton kernels and needs a CUDA GPU; this machine has none"
        if importlib.util.find_spec("liger_kernel") is None:
            return "HF Trainer's use_liger_kernel needs liger-kernel: pip install 'lora-sweep[gpu]'"
        return None
    if (row.get("settings") or {}).get("loss") != "liger":
        return None
    from trainable.fast import liger_unavailable

    return liger_unavailable()


def skip_reason(row: dict, dry_run: bool) -> str | None:
    """Why a row cannot run on this machine, liger apart (None: it can)."""
    import torch

    if (row.get("settings") or {}).get("attn_implementation") == "flex_attention" and not torch.cuda.is_available():
        return "torch's flex_attention has no backward on CPU (forward parity with sdpa: tests/unit/test_fast.py)"
    return None


# ----------------------------------------------------------------------------------------------


def run_row(row: dict, size: str, method: str, folder: Path, data_dir: str, ids: list[int], work: Path, args: argparse.Namespace) -> dict:
    """One row in its own process; a failure becomes an error row (the exception's last lines) instead
    of stopping the run; a row still running when its size's budget ends is stopped and `skipped`."""
    out = work / f"one-{size}.json"
    warmup, timed = row.get("steps", (1, 1))
    if args.warmup is not None:
        warmup = args.warmup
    if args.timed is not None:
        timed = args.timed
    if args.dry_run:
        warmup, timed = 1, 1
    env_extra: dict[str, str] = {}
    job = {"kind": row["kind"], "model_dir": str(folder), "data_dir": data_dir, "ids": ids, "method": method, "warmup": warmup, "timed": timed, "out": str(out)}
    if row["kind"] in ("seed", "hf"):
        job["recipe"] = dict(row["recipe"])
    elif row["kind"] == "ours":
        job["settings"] = dict(row["settings"])
        job["profile"] = args.profile
        job["lora_dropout"] = args.lora_dropout
    if args.dry_run and row["kind"] != "losses":  # tiny model, two micro-batches of one sequence per step
        if "recipe" in job:
            job["recipe"]["batch"] = (1, 2)
        else:
            job["settings"]["batch"] = (1, 2)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", **env_extra}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # every row alike: less fragmentation
    started = time.perf_counter()
    out.unlink(missing_ok=True)
    limit = max(1.0, args.deadline - time.perf_counter()) if getattr(args, "deadline", None) else None
    result = {"size": size, "method": method, "run": row["name"], "kind": row["kind"], "warmup_steps": warmup, "timed_steps": timed}
    if row["kind"] != "losses":
        result["micro_batch"] = (row.get("recipe") or row["settings"])["batch"][0]  # as planned: the anchor's key (comparisons)
    try:
        proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", json.dumps(job)], capture_output=True, text=True, env=env, timeout=limit)
    except subprocess.TimeoutExpired as exc:  # the size's time budget ran out in this row: not an error of the row
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        result.update(trial_status="skipped", wall_seconds=round(time.perf_counter() - started, 1), last_output=readable(stderr, 5),
                      reason=f"time budget: stopped after {limit:.0f} s, at the end of {size}'s budget (it needs ~{expected_seconds(row, size):.0f} s; "
                             f"run it with --start-row {row.get('index', '?')})")  # fmt: skip
        return result
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    if out.exists():  # the child writes its result, or its exception (trial_status error / oom)
        result.update(json.loads(out.read_text()))
    if proc.returncode == 0 and result.get("tokens_per_sec"):
        result["mfu"] = flops_per_token(size, result["lm_head_fraction"], result["head_trains"]) * result["tokens_per_sec"] / PEAK_FLOPS
    elif proc.returncode != 0:
        if "error" not in result:  # died without writing (killed, segfault): the readable end of stderr
            oom = "out of memory" in proc.stderr.lower()
            result.update(trial_status="oom" if oom else "error", error=f"exit code {proc.returncode}\n" + readable(proc.stderr))
        result.setdefault("trial_status", "error")
        result["stderr_tail"] = readable(proc.stderr, 8)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b,12b", help="comma list of 1b, 4b, 12b; run one size per GPU for parallel runs")
    ap.add_argument("--ablations", default="", help="sizes that also run the issue-4 micro-batch-1 ladder (+ sdpa, + new_tokens, + chunked loss)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps for every row (default: per row)")
    ap.add_argument("--timed", type=int, default=None, help="timed steps for every row (default: per row)")
    ap.add_argument("--only", default="", help="substrings separated by '|' (labels contain commas): run only rows whose label contains one")
    ap.add_argument("--start-row", type=int, default=0, help="skip the first N rows of each size (finish a run that its time budget cut)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds per size; rows that would start later are recorded as skipped "
                    "and a running row is stopped at the limit (default: 1b 470, 4b 500, 12b 540; 0: none)")
    ap.add_argument("--workdir", default="/tmp/seed-vs-ours")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 1 + 1 steps: exercise the code paths")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="'ours' rows' LoRA dropout (default: the seed's 0.05; 0 shows what the dropout masks cost)")
    ap.add_argument("--profile", action="store_true", help="'ours' rows record where the timed steps' GPU time goes (torch.profiler; "
                    "its overhead lowers their tokens/s: compare speeds from runs without it)")  # fmt: skip
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        try:
            if job["kind"] in ("seed", "hf"):
                job["recipe"]["batch"] = tuple(job["recipe"]["batch"])
                result = hf_run(job["model_dir"], job["data_dir"], job["method"], job["recipe"], job["warmup"], job["timed"])
            elif job["kind"] == "losses":
                result = losses_run(job["model_dir"], job["data_dir"], job["ids"], job["method"])
            else:
                job["settings"]["batch"] = tuple(job["settings"]["batch"])
                result = ours_run(job["model_dir"], job["data_dir"], job["ids"], job["method"], job["settings"], job["warmup"], job["timed"],
                                  profile=job.get("profile", False), lora_dropout=job.get("lora_dropout", 0.05))  # fmt: skip
                result["lora_dropout"] = job.get("lora_dropout", 0.05)
        except Exception as exc:  # the row's own failure, readable (a compile error's cause included), for the JSON
            oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
            Path(job["out"]).write_text(json.dumps({"trial_status": "oom" if oom else "error", "error": exception_text(exc)}, default=str))
            raise
        Path(job["out"]).write_text(json.dumps(result, default=str))
        return

    from provenance import provenance, with_provenance

    provenance()  # taken now: the date is the run's start
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.perf_counter()
    for size in args.sizes.split(","):
        folder = work / f"gemma3-{size}"
        build_seconds = 0.0
        if args.dry_run:
            from trainable.tiny import ensure_tiny

            folder = ensure_tiny()
        elif not (folder / "BUILT").exists():  # a rerun on the same machine reuses the checkpoint
            build_seconds = build_checkpoint(size, folder)
            (folder / "BUILT").write_text("ok")
        data_dir, ids = prepare_data(folder, work / f"data-{size}")  # one cache per size: two sizes may run at once
        method = ARCH[size]["method"]
        plan = rows_for(size, size in args.ablations.split(","))
        for index, row in enumerate(plan):
            row["index"] = index  # for "run it with --start-row N"
        plan = plan[args.start_row :]
        budget = args.budget_s if args.budget_s is not None else 0 if args.dry_run else BUDGET_S.get(size, 540)
        size_started = time.perf_counter()
        args.deadline = size_started + budget if budget else None
        if args.only:
            plan = [r for r in plan if any(w.strip() and w.strip() in r["name"] for w in args.only.split("|"))]
        print(f"{size}: {len(plan)} rows; checkpoint built in {build_seconds:.0f} s", flush=True)
        for row in plan:
            reason, liger = skip_reason(row, args.dry_run), liger_reason(row)
            left = args.deadline - time.perf_counter() if args.deadline else None
            if left is not None and left < expected_seconds(row, size):
                reason = (f"time budget: {max(0.0, left):.0f} s left of {budget:.0f} s for {size}, the row needs ~{expected_seconds(row, size):.0f} s "
                          f"(run it with --start-row {row['index']})")  # fmt: skip
            if not reason and liger and row["kind"] == "ours" and (row["settings"]["lora_dtype"] == "bfloat16" or row["settings"]["compile"]):
                # liger-kernel cannot be imported for our loss: the all-switches row still measures the others,
                # with the chunked loss instead, said in its label
                row = {**row, "settings": {**row["settings"], "loss": "chunked"}}
                row["name"] = label("ours", row["settings"]) + " [liger unavailable]"
                result = run_row(row, size, method, folder, data_dir, ids, work, args)
                result["liger_skipped"] = liger
            elif reason or liger:
                reason = reason or liger
                result = {"size": size, "method": method, "run": row["name"], "kind": row["kind"], "trial_status": "skipped", "reason": reason}
            else:
                result = run_row(row, size, method, folder, data_dir, ids, work, args)
                if result["trial_status"] == "oom" and row["kind"] == "hf" and not row["recipe"]["ckpt"]:
                    rows.append(result)  # HF Trainer tuned does not fit without checkpointing: measure it with
                    row = {**row, "recipe": {**row["recipe"], "ckpt": True}}
                    row["name"] = label("hf", row["recipe"])
                    result = run_row(row, size, method, folder, data_dir, ids, work, args)
            result["elapsed_seconds"] = round(time.perf_counter() - started, 1)
            rows.append(result)
            Path(args.out).write_text(json.dumps(with_provenance({"build_seconds": build_seconds, "rows": rows, "comparisons": comparisons(rows)}), indent=2, default=str))
            print(json.dumps({k: v for k, v in result.items() if k not in ("error", "derived", "losses", "recipe", "stderr_tail", "dynamo_counters", "profile")}, default=str)[:600], flush=True)
            if result.get("profile"):
                print(json.dumps({k: v for k, v in result["profile"].items() if k != "top"}), flush=True)
            if result.get("trial_status") in ("error", "oom"):
                print(result["error"][-1500:], flush=True)
    summary(rows, args.sizes.split(","))


def comparisons(rows: list[dict]) -> list[dict]:
    """Every measured row against the same run's seed row and its HF Trainer tuned anchor: the faster
    of the HF Trainer tuned rows (with or without torch_compile) at the row's own micro-batch and
    size. No anchor measured at that micro-batch: no "x HF" (None), never another micro-batch's."""
    out = []
    for r in rows:
        if not r.get("tokens_per_sec"):
            continue
        size, micro = r["size"], micro_batch(r)
        seed = next((x for x in rows if x["size"] == size and x["kind"] == "seed" and x.get("tokens_per_sec")), None)
        tuned = [x for x in rows if x["size"] == size and x["kind"] == "hf" and x.get("tokens_per_sec") and micro_batch(x) == micro]
        anchor = max(tuned, key=lambda x: x["tokens_per_sec"], default=None)
        out.append({"size": size, "run": r["run"], "micro_batch": micro, "tokens_per_sec": r["tokens_per_sec"],
                    "x_seed": r["tokens_per_sec"] / seed["tokens_per_sec"] if seed else None,
                    "x_hf": r["tokens_per_sec"] / anchor["tokens_per_sec"] if anchor else None, "hf_anchor": anchor["run"] if anchor else None,
                    "peak_vram_gb": r.get("peak_vram_gb"), "x_seed_peak": r["peak_vram_gb"] / seed["peak_vram_gb"] if seed and seed.get("peak_vram_gb") and r.get("peak_vram_gb") else None,
                    "peak_vram_reserved_gb": r.get("peak_vram_reserved_gb"), "mfu": r.get("mfu")})  # fmt: skip
    return out


def micro_batch(row: dict) -> int:
    """The micro-batch of a result row as planned (run_row records it; a dry run trains 1 x 2 under
    every label); rows of older result files: the one their label names."""
    if row.get("micro_batch"):
        return int(row["micro_batch"])
    return int(row["run"].split("mb ", 1)[1].split("x", 1)[0])


def summary(rows: list[dict], sizes: list[str]) -> None:
    nan = float("nan")
    show = lambda v, f: format(v, f) if v is not None else format(nan, f)  # noqa: E731
    print(f"\n{'size':<4} {'run':<100} {'tok/s':>8} {'x seed':>7} {'x HF':>6} {'alloc GB':>9} {'x seed':>7} {'resv GB':>8} {'MFU':>6}")
    print("x HF: against the faster HF Trainer tuned row (torch_compile or not) at the row's own micro-batch, this run")
    table = comparisons(rows)
    for size in sizes:
        for c in (c for c in table if c["size"] == size):
            print(f"{size:<4} {c['run'][:100]:<100} {c['tokens_per_sec']:>8.0f} {show(c['x_seed'], '>7.2f')} {show(c['x_hf'], '>6.2f')} "
                  f"{show(c['peak_vram_gb'], '>9.2f')} {show(c['x_seed_peak'], '>7.2f')} {show(c['peak_vram_reserved_gb'], '>8.2f')} {show(c['mfu'], '>6.1%')}")  # fmt: skip
        for r in rows:
            if r["size"] == size and r["kind"] == "losses" and r.get("max_rel_diff"):
                for name, diff in r["max_rel_diff"].items():
                    print(f"{size:<4} 50-loss check, {name} vs HF Trainer: max rel diff {diff:.4f} (within {r['rtol']}: {r['within_tolerance'][name]})")
            elif r["size"] == size and r.get("trial_status") in ("skipped", "error", "oom"):
                print(f"{size:<4} {r['run'][:100]:<100} {r['trial_status']}: {(r.get('reason') or r.get('error') or '')[-160:]!r}")


if __name__ == "__main__":
    main()
