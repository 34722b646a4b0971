"""The sweep users compare against (issue 30): the same seeded trials one at a time, each a fresh
Hugging Face Trainer + PEFT run tuned for speed, as a Ray Tune + HF Trainer user runs them.

    python3 bench/hf_serial.py --model /tmp/packing/gemma3-1b --configs '[{...}]' --steps 10 --seq 1024 --out hf.json

bench/packing.py runs this (mode `hf`) in its own process, so the GPU's memory is all given back
before and after it. Every trial: the base loaded from disk (bf16 on CUDA, sdpa attention),
get_peft_model(LoraConfig(r, alpha, the sweep's dropout, our target pattern for attention or
all-linear), autocast_adapter_dtype=False) (bf16 adapters), frozen embeddings, Trainer with
per_device_train_batch_size x gradient_accumulation_steps = the trial's batch, max_steps, its
learning rate, the train section's schedule, warm-up, weight decay and clipping,
adamw_torch_fused, use_liger_kernel from micro-batch LIGER_FROM up (HF Trainer's best switch:
below it liger is slower), logging_nan_inf_filter=False, no checkpoints, no reporting,
no gradient checkpointing (retried once with it when a trial runs out of memory, as a user would).
On a CPU (the dry run): fp32, adamw_torch, no liger (liger-kernel's kernels need CUDA).

Compile is off: a 10-60-step trial would pay its compile again in every trial (each one a fresh
model), and a user gets torch_compile only when they ask for it. The measurement behind it (its
compile time against its gain per step, at 8x4 and 32x1): bench/BENCH.md, "HF Trainer tuned with
torch_compile, and its liger switch at micro-batches 4 and 8 (issue 30)".

Same data, same tokens as ours: the demo chat data prepared by our pipeline (trainable/data.py
`prepare` with the model's tokenizer, max_seq_len --seq, packed rows with position_ids restarting
at each example, labels -100 outside the replies), fed in our trainer's row order
(trainable.data.row_order, seed 0) through our `collate` (right padding, the pad tail its own
positions), so every trial trains exactly the rows its twin in our sweep trains.

Per trial: load, train, eval and wall seconds; the tokens trained, counted (the non-padding
tokens of every micro-batch the model was run on in training, as the collator counted them);
the last logged train loss (the mean over the last logging window, --log-every steps, as ours
logs); eval_loss at the end only, on our prepared eval set, token-weighted over reply tokens as our
trainer computes it (Trainer.evaluate averages per-batch means, which is not the same figure; the
pass costs the same forwards); the CUDA peak memory; status completed, oom or error (with the
exception). --deadline (epoch seconds): no trial starts after it. The JSON is rewritten after
every trial, so a process stopped from outside keeps what finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import versions  # noqa: E402
from sweepbench import point_key  # noqa: E402

DEMO = ROOT / "search_spaces" / "data" / "demo"
TRAIN_KEYS = ("input_ids", "labels", "position_ids")


def train_defaults() -> dict[str, Any]:
    """The train section's defaults for what the sweep does not vary: what our trials train with."""
    from core.schema import TrainSection

    fields = TrainSection.model_fields
    return {k: fields[k].default for k in ("lora_dropout", "warmup_ratio", "lr_scheduler", "weight_decay", "max_grad_norm", "seed")}


def prepare_demo(model_path: str, seq: int, cache: Path) -> tuple[str, dict[str, Any]]:
    """The demo data as our sweep prepares it for this model and --seq: (folder, stats)."""
    from core.schema import DataSection
    from trainable.data import prepare
    from trainable.model import load_tokenizer

    section = DataSection(train=str(DEMO / "train.jsonl"), eval=str(DEMO / "eval.jsonl"), max_seq_len=seq)
    prepared = prepare(section, load_tokenizer(model_path), cache, seed=train_defaults()["seed"], log=lambda s: None)
    return str(prepared.folder), prepared.stats


class Counter:
    """Tokens of the micro-batches the model was run on in training. The collator notes every batch
    it builds; the data loader builds one ahead of what is consumed (accelerate looks ahead for the
    end), so only the first `forwards` of them were trained."""

    def __init__(self) -> None:
        self.built: list[tuple[int, int]] = []  # (tokens, loss tokens) per collated micro-batch
        self.forwards = 0

    def hook(self, module: Any, args: Any) -> None:
        if module.training:
            self.forwards += 1

    def totals(self) -> tuple[int, int]:
        done = self.built[: self.forwards]
        return sum(t for t, _ in done), sum(n for _, n in done)


# HF Trainer tuned turns liger on from this micro-batch (seq 1024, Gemma 3 1B, one H100): below it,
# liger's own chunk sizing makes ~128 chunks of 8 tokens a forward at Gemma's vocabulary and the
# step is faster without liger; from 8 up liger is as fast or faster and holds far less memory.
# Measured at 1, 2, 4, 8 and 32: bench/BENCH.md, issue 30's sections of the thirteenth and
# fifteenth sessions. The twelfth session's sweep had liger at every micro-batch (1).
LIGER_FROM = 8


def liger_on(micro: int, liger_from: int, cuda: bool) -> bool:
    """Whether a trial at micro-batch `micro` runs HF Trainer's use_liger_kernel (CUDA only: its
    kernels are Triton's)."""
    return cuda and micro >= liger_from


def run_trial(model_path: str, data_dir: str, config: dict[str, Any], steps: int, method: str, dropout: float, log_every: int,
              checkpointing: bool, liger_from: int = LIGER_FROM) -> dict[str, Any]:  # fmt: skip
    """One configuration, start to end, as its own Trainer + PEFT run (see the module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from realsize import load_frozen_base
    from transformers import Trainer, TrainingArguments

    from trainable.data import collate, load_split, row_order
    from trainable.model import lora_target_pattern

    defaults = train_defaults()
    cuda = torch.cuda.is_available()
    micro, accum = config["batch"]
    started = time.time()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = load_frozen_base(model_path, method)  # embeddings frozen with the base
    lora = LoraConfig(r=config["lora_r"], lora_alpha=config["lora_r"] * config["lora_alpha_ratio"], lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=lora_target_pattern(model, config["target_modules"]))  # fmt: skip
    torch.manual_seed(defaults["seed"])
    # autocast_adapter_dtype=False: PEFT leaves the adapters in the base's dtype (bf16 on CUDA)
    # instead of upcasting them to fp32; 4-bit layers make theirs in fp32, so those are cast once
    model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    train_ds, eval_ds = load_split(data_dir, "train"), load_split(data_dir, "eval")
    counter = Counter()

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):  # our trainer's order: the same rows, micro-batch by micro-batch
            for i in row_order(len(train_ds), defaults["seed"], 0):
                yield train_ds[i]

    def collator(rows: list[dict]) -> dict[str, Any]:
        batch = collate({k: [r[k] for r in rows] for k in TRAIN_KEYS}, pad_id)
        counter.built.append((batch["tokens"], batch["loss_tokens"]))
        return {k: batch[k] for k in TRAIN_KEYS}

    scheduler = "constant_with_warmup" if defaults["lr_scheduler"] == "constant" else defaults["lr_scheduler"]
    args = TrainingArguments(
        output_dir=str(Path("/tmp") / f"hf-serial-{point_key(config)[:40].replace('|', '_').replace('=', '')}"),
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, max_steps=steps, learning_rate=config["learning_rate"],
        lr_scheduler_type=scheduler, warmup_steps=int(round(defaults["warmup_ratio"] * steps)), weight_decay=defaults["weight_decay"],
        max_grad_norm=defaults["max_grad_norm"], seed=defaults["seed"], bf16=cuda, use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch", use_liger_kernel=liger_on(micro, liger_from, cuda),
        # named only when on: transformers 5.x renames it (activation_checkpointing) and warns at every mention
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} if checkpointing else {}),
        torch_compile=False, logging_nan_inf_filter=False, logging_steps=log_every, save_strategy="no", eval_strategy="no", report_to=[],
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=cuda,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator)
    model.register_forward_pre_hook(counter.hook)
    loaded = time.time()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    trained = time.time()
    eval_loss = evaluate(model, eval_ds, micro, pad_id)
    ended = time.time()
    tokens, loss_tokens = counter.totals()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "status": "completed", "steps": trainer.state.global_step, "tokens": tokens, "loss_tokens": loss_tokens,
        "micro_batches": counter.forwards, "train_loss": losses[-1] if losses else None, "eval_loss": eval_loss,
        "start": started, "end": ended, "load_seconds": round(loaded - started, 3), "train_seconds": round(trained - loaded, 3),
        "eval_seconds": round(ended - trained, 3), "wall_seconds": round(ended - started, 3), "gradient_checkpointing": checkpointing,
        "optim": args.optim if isinstance(args.optim, str) else args.optim.value, "liger": bool(args.use_liger_kernel), "dtype": str(dtype).removeprefix("torch."),
        "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}),
    }  # fmt: skip
    if cuda:
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del trainer, model
    return out


def evaluate(model: Any, eval_ds: Any, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over the eval set's reply tokens, in batches of `batch_size` (our
    trainer's eval batch: the micro-batch), as trainable.cohort evaluates."""
    import torch

    from trainable.data import eval_batches

    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(eval_ds, batch_size, pad_id):
            if not batch["loss_tokens"]:
                continue
            out = model(**{k: batch[k].to(device) for k in TRAIN_KEYS})
            total += float(out.loss) * batch["loss_tokens"]  # the model's loss: the mean over the batch's reply tokens
            count += batch["loss_tokens"]
    model.train()
    return total / max(count, 1)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_trials(model_path: str, data_dir: str, configs: list[dict[str, Any]], steps: int, seq: int, method: str = "lora", dropout: float | None = None,
               log_every: int | None = None, deadline: float | None = None, on_trial: Callable[[list[dict]], None] | None = None,
               liger_from: int = LIGER_FROM) -> list[dict[str, Any]]:  # fmt: skip
    """Every configuration one after the other (see the module docstring); a record per trial, with
    its config key (sweepbench.point_key) and the params compare_losses reads. No trial starts after
    `deadline` (epoch seconds): those are recorded as `not_started`. `on_trial` gets the records
    after each trial."""
    dropout = train_defaults()["lora_dropout"] if dropout is None else dropout
    log_every = log_every or max(1, steps // 2)
    records: list[dict[str, Any]] = []
    for config in configs:
        alpha = config["lora_r"] * config["lora_alpha_ratio"]
        record: dict[str, Any] = {"config": point_key(config), "lora_r": config["lora_r"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
                                  "target_modules": config["target_modules"], "learning_rate": config["learning_rate"], "batch": list(config["batch"]),
                                  "lora_dropout": dropout, "seq": seq}  # fmt: skip
        if deadline is not None and time.time() >= deadline:
            records.append({**record, "status": "not_started", "error": "the mode's time budget was spent before this trial"})
        else:
            records.append(run_one(model_path, data_dir, config, record, steps, method, dropout, log_every, liger_from))
        if on_trial is not None:
            on_trial(records)
    return records


def run_one(model_path: str, data_dir: str, config: dict[str, Any], record: dict[str, Any], steps: int, method: str, dropout: float,
            log_every: int, liger_from: int = LIGER_FROM) -> dict[str, Any]:  # fmt: skip
    """`record` completed by one trial: without gradient checkpointing, then with it if that ran out of memory."""
    import torch

    started = time.time()
    for checkpointing in (False, True):
        try:
            record.update(run_trial(model_path, data_dir, config, steps, method, dropout, log_every, checkpointing, liger_from))
            record.pop("error", None)
            break
        except torch.OutOfMemoryError as e:
            record.update(status="oom", error=f"{type(e).__name__}: {str(e)[:400]}", gradient_checkpointing=checkpointing)
        except Exception as e:  # noqa: BLE001 - one trial's failure is its record, the next trial still runs
            record.update(status="error", error="".join(traceback.format_exception(e)[-6:])[-2000:])
            break
        finally:
            free_memory()
    if record["status"] != "completed":
        record.update(start=started, end=time.time(), wall_seconds=round(time.time() - started, 3))
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the base model: a local folder or tiny-gemma3")
    ap.add_argument("--configs", required=True, help="a JSON list of configurations (bench/sweepbench.py seeded_configs' points)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True, help="data.max_seq_len")
    ap.add_argument("--method", choices=("lora", "qlora"), default="lora")
    ap.add_argument("--dropout", type=float, default=None, help="lora_dropout (default: the train section's)")
    ap.add_argument("--log-every", type=int, default=None, help="logging_steps (default: steps // 2, as bench/packing.py's sweeps log)")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds after which no trial starts")
    ap.add_argument("--cache", default="/tmp/hf-serial-data", help="our prepared-data cache")
    ap.add_argument("--liger-from", type=int, default=LIGER_FROM, help=f"use_liger_kernel at micro-batches >= this, off below (default {LIGER_FROM}: see LIGER_FROM; 1: everywhere)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        configs = json.loads(args.configs)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--configs: not JSON ({e}); give packing.py's configs list") from e
    from trainable.model import resolve_model_path

    model_path = resolve_model_path(args.model)
    out = Path(args.out)
    started = time.time()
    data_dir, stats = prepare_demo(model_path, args.seq, Path(args.cache))
    result: dict[str, Any] = {"versions": versions(), "model": model_path, "data": data_dir, "data_stats": {k: stats[k] for k in ("train", "eval") if k in stats},
                              "prepare_seconds": round(time.time() - started, 3), "trials": []}  # fmt: skip

    def write(records: list[dict]) -> None:
        result["trials"] = records
        out.write_text(json.dumps(result, indent=2))

    write([])
    run_trials(model_path, data_dir, configs, args.steps, args.seq, args.method, args.dropout, args.log_every, args.deadline, on_trial=write, liger_from=args.liger_from)


if __name__ == "__main__":
    main()
