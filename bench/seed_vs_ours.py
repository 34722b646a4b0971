"""The seed's training recipe against our trainable, side by side on one GPU (issue 4).

    python bench/seed_vs_ours.py --sizes 1b,12b --out results.json
    python bench/seed_vs_ours.py --dry-run --out /tmp/dry.json      # CPU, tiny model: checks the code paths

The seed recipe, exactly as written: Hugging Face Trainer + PEFT LoRA (r=16, alpha=16, dropout 0.05,
q/k/v/o/gate/up/down) + modules_to_save=['embed_tokens', 'lm_head'] + paged_adamw_8bit + gradient
checkpointing + micro-batch 1 x 32 accumulation, eager attention, bf16; QLoRA adds NF4 with double
quantization and bf16 compute. Ours: trainable.train.run, first with the seed's settings, then
with one switch more at a time (sdpa, new_tokens embeddings, chunked loss, a large micro-batch with
checkpointing only if needed), so each switch is measured. Every run: random-weight real
architecture (bench/realsize.py), seq 1024 packed rows, 32 sequences per optimizer step, --warmup
untimed steps then --timed timed steps, in its own process (clean CUDA peak statistics).

MFU, per token: 4 x (decoder linear params) [frozen weights: forward + input gradient]
+ 6 x layers x seq x heads x head_dim [causal attention, QK^T and AV, forward + backward]
+ (4 or 6) x vocab x hidden x f [lm_head: 6 when its weight trains (the seed's modules_to_save),
4 when frozen; f = fraction of tokens that go through it: 1 for the seed, the reply-token fraction
for our chunked loss]; LoRA's own FLOPs and recomputation are not counted. Divided by the H200's
dense bf16 peak, 989 TFLOP/s.
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
SEQ = 1024
SEQS_PER_STEP = 32
SEED_TARGETS = ["k_proj", "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]

# Our trainable, one switch more at a time. The last one is what a sweep would use.
OURS = [
    ("ours: seed settings", dict(batch=(1, 32), attn_implementation="eager", gradient_checkpointing=True, loss="model", optimizer="paged_adamw_8bit"), "full"),
    ("+ sdpa", dict(batch=(1, 32), attn_implementation="sdpa", gradient_checkpointing=True, loss="model", optimizer="paged_adamw_8bit"), "full"),
    ("+ new_tokens", dict(batch=(1, 32), attn_implementation="sdpa", gradient_checkpointing=True, loss="model", optimizer="paged_adamw_8bit"), "new_tokens"),
    ("+ chunked loss", dict(batch=(1, 32), attn_implementation="sdpa", gradient_checkpointing=True, loss="chunked", optimizer="paged_adamw_8bit"), "new_tokens"),
    ("+ micro-batch 8, checkpointing auto", dict(batch=(8, 4), attn_implementation="sdpa", gradient_checkpointing="auto", loss="chunked", optimizer="auto"), "new_tokens"),
]  # fmt: skip
# A leaner split of the same 32 sequences, for where memory is the target (12B QLoRA: <= 60% of the seed).
LEAN = ("micro-batch 2, checkpointing auto", dict(batch=(2, 16), attn_implementation="sdpa", gradient_checkpointing="auto", loss="chunked", optimizer="auto"), "new_tokens")


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


def seed_run(model_dir: str, data_dir: str, method: str, warmup: int, timed: int) -> dict:
    """HF Trainer + PEFT, the seed's recipe; times steps after `warmup` with CUDA syncs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    kwargs: dict = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "eager"}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=kwargs["dtype"])  # fmt: skip
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method != "qlora" and cuda:
        model.to("cuda")
    config = LoraConfig(lora_alpha=16, lora_dropout=0.05, r=16, bias="none", task_type="CAUSAL_LM",
                        target_modules=SEED_TARGETS, modules_to_save=["embed_tokens", "lm_head"])  # fmt: skip
    model = get_peft_model(model, config)
    load_seconds = time.perf_counter() - started
    steps = warmup + timed
    batches = micro_batches(data_dir, 1, steps)
    step_tokens = [sum(b["tokens"] for b in batches[i * SEQS_PER_STEP : (i + 1) * SEQS_PER_STEP]) for i in range(steps)]

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            for b in batches:  # the seed knows nothing of packing: plain causal attention over each row
                yield {"input_ids": b["input_ids"][0], "labels": b["labels"][0]}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    args = TrainingArguments(
        output_dir="/tmp/seed-run", per_device_train_batch_size=1, gradient_accumulation_steps=SEQS_PER_STEP,
        bf16=cuda, gradient_checkpointing=True, optim="paged_adamw_8bit" if cuda else "adamw_torch",
        learning_rate=2e-4, max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda,
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate, callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens, seconds = sum(step_tokens[warmup:]), sum(times[warmup:])
    out = {"tokens_per_sec": tokens / seconds, "step_seconds": times, "load_seconds": load_seconds, "trial_status": "completed",
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "lm_head_fraction": 1.0, "head_trains": True}  # fmt: skip
    if cuda:
        out.update(peak_vram_gb=torch.cuda.max_memory_allocated() / 2**30, peak_vram_reserved_gb=torch.cuda.max_memory_reserved() / 2**30)
    return out


def ours_run(model_dir: str, data_dir: str, template_ids: list[int], method: str, settings: dict, embeddings: str, warmup: int, timed: int) -> dict:
    """trainable.train.run; its tokens/sec already leaves out the first logging window (= warm-up)."""
    from contextlib import contextmanager

    from sweep.config import TrainSection
    from trainable.train import TrialSpec, run

    class Reporter:
        reports: list = []

        def report(self, metrics, checkpoint_dir):
            self.reports.append(metrics)

        @contextmanager
        def restore(self):
            yield None

    steps = warmup + timed
    train = TrainSection(method=method, lora_r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", learning_rate=2e-4,
                         max_steps=steps, eval_every=steps, log_every=warmup, lr_scheduler="constant", warmup_ratio=0.0, **settings)  # fmt: skip
    spec = TrialSpec(model_id=model_dir, revision=None, data_dir=data_dir, train=train, embeddings=embeddings,
                     template_ids=tuple(template_ids), max_seq_len=SEQ, threads=8)  # fmt: skip
    reporter = Reporter()
    last = run(spec, reporter)
    derived = reporter.reports[0].get("derived", {})
    out = {k: v for k, v in last.items() if k not in ("history", "derived")}
    out.update(trainable_params=derived.get("trainable_params"), gradient_checkpointing=derived.get("gradient_checkpointing"),
               head_trains=embeddings == "full", lm_head_fraction=last["loss_tokens_per_sec"] / last["tokens_per_sec"] if settings["loss"] == "chunked" else 1.0)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b,12b")
    ap.add_argument("--ablations", default="1b", help="sizes that also run every intermediate 'ours' row")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timed", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/seed-vs-ours")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 1 + 1 steps: exercise the code paths")
    ap.add_argument("--out", required=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        if job["kind"] == "seed":
            result = seed_run(job["model_dir"], job["data_dir"], job["method"], job["warmup"], job["timed"])
        else:
            result = ours_run(job["model_dir"], job["data_dir"], job["ids"], job["method"], job["settings"], job["embeddings"], job["warmup"], job["timed"])
        Path(job["out"]).write_text(json.dumps(result))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        folder = work / f"gemma3-{size}"
        if args.dry_run:
            from trainable.tiny import ensure_tiny

            folder, args.warmup, args.timed = ensure_tiny(), 1, 1
        else:
            build_checkpoint(size, folder)
        data_dir, ids = prepare_data(folder, work / "data")
        method = ARCH[size]["method"]
        variants = OURS if size in args.ablations.split(",") else [OURS[-1], LEAN]
        jobs = [("seed", {"kind": "seed"})] + [(name, {"kind": "ours", "settings": s, "embeddings": e}) for name, s, e in variants]
        for name, job in jobs:
            out = work / "one.json"
            job.update(model_dir=str(folder), data_dir=data_dir, ids=ids, method=method, warmup=args.warmup, timed=args.timed, out=str(out))
            if args.dry_run:
                job["settings"] = {**job.get("settings", {}), "batch": (1, 2)} if job["kind"] == "ours" else None
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", json.dumps(job)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
            row = {"size": size, "method": method, "run": name, "wall_seconds": round(time.perf_counter() - started, 1)}
            if proc.returncode == 0:
                row.update(json.loads(out.read_text()))
                row["mfu"] = flops_per_token(size, row["lm_head_fraction"], row["head_trains"]) * row["tokens_per_sec"] / PEAK_FLOPS
            else:
                row.update(trial_status="error", error=proc.stderr[-3000:])
            rows.append(row)
            Path(args.out).write_text(json.dumps(rows, indent=2))
            print(json.dumps({k: v for k, v in row.items() if k != "error"})[:500], flush=True)
            if row.get("trial_status") == "error":
                print(row["error"][-1500:], flush=True)

    print(f"\n{'size':<4} {'run':<38} {'tok/s':>8} {'x seed':>7} {'alloc GB':>9} {'x seed':>7} {'resv GB':>8} {'MFU':>6}")
    for size in args.sizes.split(","):
        group = [r for r in rows if r["size"] == size and r.get("tokens_per_sec")]
        seed = next((r for r in group if r["run"] == "seed"), None)
        for r in group:
            speed = r["tokens_per_sec"] / seed["tokens_per_sec"] if seed else float("nan")
            mem = r.get("peak_vram_gb", float("nan")) / seed.get("peak_vram_gb", float("nan")) if seed and seed.get("peak_vram_gb") else float("nan")
            print(f"{size:<4} {r['run']:<38} {r['tokens_per_sec']:>8.0f} {speed:>7.2f} {r.get('peak_vram_gb', float('nan')):>9.2f} {mem:>7.2f} "
                  f"{r.get('peak_vram_reserved_gb', float('nan')):>8.2f} {r['mfu']:>6.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
