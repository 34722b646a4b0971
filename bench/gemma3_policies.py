"""Gemma 3 at real size on one GPU: the three embedding policies for 1B LoRA, 4B LoRA and 12B QLoRA.

    python bench/gemma3_policies.py --sizes 1b,4b,12b --out results.json
    python bench/gemma3_policies.py --dry-run --out /tmp/policies.json     # CPU, tiny model: every code path

For each size, a random-weight checkpoint of the real architecture is built on the GPU (bf16),
saved to --workdir with the tiny Gemma-format tokenizer (its token ids are valid in the real
vocabulary; throughput and memory do not depend on the weights' values), and loaded back through
the normal path (`from_pretrained`, with BitsAndBytesConfig for QLoRA). Then each policy runs as
one trial in a fresh process (clean CUDA peak statistics), as a sweep's worker trains it: a cohort
of one (bench/cohort_of_one.py, trainable/cohort_worker.run_worker):
seq 1024 packed, the seed's LoRA settings (r=16, alpha=16, dropout 0.05, q/k/v/o/gate/up/down),
micro-batch 1 x --accum accumulation, paged_adamw_8bit, gradient checkpointing on (as the seed),
the model's own loss and fp32 LoRA (the settings these rows were first measured with, before the
fast step, so that bench/results-gemma3-policies-h200.json and the VRAM estimator's calibration,
tests/unit/test_estimate.py, stay comparable). Each trial's figures (peak allocated / reserved
VRAM, tokens/sec after the first step, load seconds, trainable params) go to --out as JSON, and a
table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import with_provenance  # noqa: E402
from realsize import ARCH, build_checkpoint, prepare_data  # noqa: E402

POLICIES = ("full", "new_tokens", "frozen")


def one_trial(model_dir: str, data_dir: str, template_ids: list[int], method: str, policy: str, steps: int, accum: int, workdir: str) -> dict:
    """Runs in its own process; returns the final metrics plus what the trial derived."""
    from cohort_of_one import train_one
    from sweep.config import TrainSection
    from trainable.cohort_worker import BaseSpec

    train = TrainSection(
        method=method, lora_r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", learning_rate=2e-4,
        batch=(1, accum), max_steps=steps, eval_every=steps, log_every=1, optimizer="paged_adamw_8bit", gradient_checkpointing=True,
        loss="model", lora_dtype="float32", compile=False,
    )  # fmt: skip
    base = BaseSpec(model_id=model_dir, revision=None, data_dir=data_dir, train=train, embeddings=policy,
                    template_ids=tuple(template_ids), max_seq_len=1024, threads=8)  # fmt: skip
    run = train_one(base, workdir)
    keep = ("trainable_params", "embeddings", "embeddings_reason", "lora_layers", "quantization")
    last = {k: v for k, v in run.end.items() if k not in ("history", "evals_replay")}
    return {**last, **{k: run.params.get(k) for k in keep}, "model_class": run.model_class, "total_params": run.total_params}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b,4b,12b")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/gemma3-bench")
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny model instead of the real sizes (--sizes is ignored): exercise the code paths")
    ap.add_argument("--out", required=True)
    ap.add_argument("--one", nargs=6, metavar=("MODEL_DIR", "DATA_DIR", "IDS", "METHOD", "POLICY", "STEPS_ACCUM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        model_dir, data_dir, ids, method, policy, steps_accum = args.one
        steps, accum = (int(x) for x in steps_accum.split("x"))
        result = one_trial(model_dir, data_dir, json.loads(ids), method, policy, steps, accum, args.workdir)
        Path(args.out).write_text(json.dumps(result))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in ["tiny"] if args.dry_run else args.sizes.split(","):
        method = "lora" if args.dry_run else ARCH[size]["method"]
        build_seconds = 0.0
        if args.dry_run:
            from trainable.tiny import ensure_tiny

            folder = ensure_tiny()  # the shared cache: never removed below
        else:
            folder = work / f"gemma3-{size}"
            build_seconds = build_checkpoint(size, folder)
        data_dir, ids = prepare_data(folder, work / "data")
        for policy in args.policies.split(","):
            out = work / f"{size}-{policy}.json"
            started = time.perf_counter()
            cmd = [sys.executable, __file__, "--out", str(out), "--workdir", str(work), "--one", str(folder), data_dir, json.dumps(ids),
                   method, policy, f"{args.steps}x{args.accum}"]  # fmt: skip
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
            row = {"size": size, "method": method, "policy": policy, "build_seconds": round(build_seconds, 1),
                   "wall_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
            if proc.returncode == 0:
                row.update(json.loads(out.read_text()))
            else:
                row.update(trial_status="error", error=proc.stderr[-2000:])
            rows.append(row)
            Path(args.out).write_text(json.dumps(with_provenance(rows), indent=2))
            print(json.dumps(row)[:600], flush=True)
        if not args.dry_run:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\n{'size':<5} {'method':<6} {'policy':<11} {'status':<10} {'peak alloc GB':>13} {'peak resv GB':>12} {'tok/s':>8} {'load s':>7} {'trainable':>12}")
    for r in rows:
        print(
            f"{r['size']:<5} {r['method']:<6} {r['policy']:<11} {r.get('trial_status', '?'):<10} {r.get('peak_vram_gb', float('nan')):>13.2f} "
            f"{r.get('peak_vram_reserved_gb', float('nan')):>12.2f} {r.get('tokens_per_sec', float('nan')):>8.0f} "
            f"{r.get('load_seconds', float('nan')):>7.1f} {r.get('trainable_params') or 0:>12,}"
        )


if __name__ == "__main__":
    main()
