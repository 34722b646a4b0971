"""Many trials, one base model (issue 15): cohorts of K LoRA members on one GPU against single trials.

    CUDA_VISIBLE_DEVICES=0 python bench/cohort.py --sizes 1b --out cohort-1b.json     # about 5-6 min
    CUDA_VISIBLE_DEVICES=1 python bench/cohort.py --sizes 12b --out cohort-12b.json   # about 7-8 min
    python bench/cohort.py --dry-run --out /tmp/cohort-dry.json                       # CPU, tiny model

Random-weight real architecture (bench/realsize.py), packed rows of 1024 tokens, frozen embeddings,
chunked reply-token loss, sdpa, LoRA dropout 0.05 (one cohort row 0.0), gradient checkpointing
auto (one cohort row off). Rows, most important first:
- `cohort`: K mixed members (ranks 8-64, different targets, micro-batches 1-8, accumulation so that
  every member steps a whole number of times in the timed window) on one base model loaded once
  (members are removed and added between rows: the base is never reloaded). After --warmup untimed
  micro-steps, --timed micro-steps are timed with CUDA syncs: tokens/s in all and per member, step
  time, peak memory (allocated and reserved since the row began), MFU.
- `alone`: every distinct member configuration as one trial through the existing trainable
  (trainable.train.run, lora_dtype bfloat16 on a GPU: the fastest single trial), each in its own
  process; its tokens/s leaves out the first logging window (= the warm-up steps).
- `makespan` (written last, one per cohort row): the cohort's seconds for the tokens its members
  processed against the sum of the same members' alone seconds for the same tokens (the training
  step alone), and a projected sweep of those K trials of --sweep-steps optimizer steps each:
  one base load + the cohort at its measured tokens/s, against K loads + K alone runs (issue 15's
  target: <= 0.15x one-at-a-time).
MFU uses bench/seed_vs_ours.py's FLOPs per token (frozen linears 4x, attention, lm_head on the reply
tokens; LoRA's own FLOPs and recomputation not counted) over the H200's dense bf16 peak. Every row
is written to --out as soon as it finishes, with provenance (bench/provenance.py); a run cut short
keeps what finished. --budget stops starting new rows once that many seconds have passed.
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

from provenance import with_provenance  # noqa: E402
from realsize import ARCH, build_checkpoint, prepare_data  # noqa: E402
from seed_vs_ours import PEAK_FLOPS, flops_per_token  # noqa: E402

SEQ = 1024
DROPOUT = 0.05
# (rank, targets, micro-batch, accumulation, learning rate): a cohort of K takes the first K (cycling, new seeds)
MEMBERS_1B = [
    (8, "all-linear", 1, 8, 2e-4), (16, "attention", 2, 4, 5e-4), (32, "mlp", 4, 2, 1e-4), (64, "all-linear", 8, 1, 3e-4),
    (8, ["q_proj", "v_proj"], 2, 4, 1e-3), (16, "all-linear", 4, 2, 2e-4), (32, "attention", 1, 8, 4e-4), (64, "mlp", 2, 4, 1e-4),
]  # fmt: skip
MEMBERS_12B = [
    (8, "all-linear", 1, 4, 2e-4), (16, "attention", 2, 2, 5e-4), (32, "mlp", 4, 1, 1e-4), (64, "all-linear", 2, 2, 3e-4),
    (8, ["q_proj", "v_proj"], 1, 4, 1e-3), (16, "all-linear", 2, 2, 2e-4), (32, "attention", 4, 1, 4e-4), (64, "mlp", 1, 4, 1e-4),
]  # fmt: skip
# per size: cohort rows (K, dropout, gradient checkpointing), most important first; cohort micro-steps
# warm-up / timed; alone optimizer steps warm-up / timed; the default --budget (no new row after it)
PLAN = {
    "1b": {"rows": [(16, DROPOUT, "auto"), (16, 0.0, "auto"), (16, DROPOUT, False), (8, DROPOUT, "auto"), (4, DROPOUT, "auto")],
           "members": MEMBERS_1B, "warmup": 3, "timed": 8, "alone_warmup": 2, "alone_timed": 4, "budget": 320},
    "12b": {"rows": [(8, DROPOUT, "auto"), (8, 0.0, "auto"), (8, DROPOUT, False), (4, DROPOUT, "auto")],
            "members": MEMBERS_12B, "warmup": 2, "timed": 4, "alone_warmup": 1, "alone_timed": 2, "budget": 430},
}  # fmt: skip


def config_key(rank: int, targets, micro: int, accum: int) -> str:
    return json.dumps([rank, list(targets) if isinstance(targets, (list, tuple)) else targets, micro, accum])


def member_train(spec: tuple, seed: int, method: str, steps: int, dropout: float = DROPOUT):
    from sweep.config import TrainSection

    r, targets, micro, accum, lr = spec
    targets = tuple(targets) if isinstance(targets, list) else targets
    return TrainSection(method=method, lora_r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, learning_rate=lr,
                        batch=(micro, accum), max_steps=steps, eval_every=steps, log_every=steps, seed=seed, warmup_ratio=0.1)  # fmt: skip


def write_row(out: Path, row: dict) -> None:
    """Append a row to the JSON results file (atomically: a kill leaves the previous version)."""
    rows = json.loads(out.read_text())["results"] if out.exists() else []
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(with_provenance(rows + [row]), indent=2))
    tmp.replace(out)
    print(json.dumps({k: v for k, v in row.items() if k not in ("members", "error")})[:600], flush=True)


def mfu(size: str, tokens_per_sec: float, lm_head_fraction: float, cuda: bool) -> float | None:
    return flops_per_token(size, lm_head_fraction, False) * tokens_per_sec / PEAK_FLOPS if cuda else None


# ----------------------------------------------------------------------------------------------
# one single trial, through the existing trainable (own process)


def alone(job: dict) -> None:
    from contextlib import contextmanager

    import torch

    from sweep.config import TrainSection
    from trainable.train import TrialSpec, run

    class Reporter:
        reports: list = []

        def report(self, metrics, checkpoint_dir):
            self.reports.append(metrics)

        @contextmanager
        def restore(self):
            yield None

    r, targets, micro, accum = job["config"]
    steps = job["warmup"] + job["timed"]
    lora_dtype = job["lora_dtype"] if torch.cuda.is_available() else "float32"
    train = TrainSection(method=job["method"], lora_r=r, lora_alpha=2 * r, lora_dropout=DROPOUT, target_modules=tuple(targets) if isinstance(targets, list) else targets,
                         learning_rate=2e-4, batch=(micro, accum), max_steps=steps, eval_every=steps, log_every=job["warmup"], warmup_ratio=0.1,
                         lora_dtype=lora_dtype)  # fmt: skip
    spec = TrialSpec(model_id=job["model_dir"], revision=None, data_dir=job["data_dir"], train=train, max_seq_len=SEQ, threads=8)
    started = time.perf_counter()
    reporter = Reporter()
    last = run(spec, reporter)
    derived = reporter.reports[0].get("derived", {})
    cuda = torch.cuda.is_available()
    fraction = last["loss_tokens_per_sec"] / last["tokens_per_sec"]
    row = {"size": job["size"], "run": "alone", "rank": r, "targets": targets, "micro_batch": micro, "grad_accum": accum, "lora_dtype": lora_dtype,
           "config_key": config_key(r, targets, micro, accum), "dropout": DROPOUT,
           "optimizer_steps": steps, "warmup_steps": job["warmup"], "tokens_per_sec": last["tokens_per_sec"],
           "step_seconds": (micro * accum * SEQ) / last["tokens_per_sec"], "mfu": mfu(job["size"], last["tokens_per_sec"], fraction, cuda),
           "peak_vram_gb": last.get("peak_vram_gb"), "peak_vram_reserved_gb": last.get("peak_vram_reserved_gb"),
           "gradient_checkpointing": derived.get("gradient_checkpointing"), "trial_status": last["trial_status"],
           "eval_loss": last.get("eval_loss"), "load_seconds": last.get("load_seconds"), "wall_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    write_row(Path(job["out"]), row)


# ----------------------------------------------------------------------------------------------
# cohorts of K members on one base model (own process; the base is loaded once for every K)


def cohorts(job: dict) -> None:
    import torch

    from sweep.config import TrainSection
    from trainable.cohort import Cohort

    deadline = job["deadline"]
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.set_num_threads(8)
    started = time.perf_counter()
    cohort = Cohort(job["model_dir"], job["data_dir"], TrainSection(method=job["method"]), max_seq_len=SEQ)
    load_seconds = time.perf_counter() - started
    base_bytes = torch.cuda.memory_allocated() if cuda else 0
    base_gb = base_bytes / 2**30 if cuda else None
    specs = job["members"]
    warmup, timed = job["warmup"], job["timed"]
    for k, dropout, checkpointing_setting in job["rows"]:
        if time.time() > deadline:
            print(f"budget spent: cohort K={k} dropout={dropout} checkpointing={checkpointing_setting} not run", flush=True)
            break
        row_started = time.perf_counter()
        for slot in list(cohort.members):
            cohort.remove(slot)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        steps = 1000  # never reached: the row ends after warm-up + timed micro-steps
        for i in range(k):
            spec = specs[i % len(specs)]
            cohort.add(member_train(spec, seed=i, method=job["method"], steps=steps, dropout=dropout), name=f"m{i}")
        rows_per_step = sum(m.train.batch[0] for m in cohort.members.values())
        cohort.base_train = cohort.base_train.model_copy(update={"gradient_checkpointing": checkpointing_setting})
        checkpointing = cohort.plan_checkpointing(rows_per_step)
        row = {"size": job["size"], "run": "cohort", "k": k, "dropout": dropout, "checkpointing_setting": checkpointing_setting,
               "rows_per_micro_step": rows_per_step, "gradient_checkpointing": checkpointing,
               "warmup_micro_steps": warmup, "timed_micro_steps": timed, "base_load_seconds": round(load_seconds, 1), "base_vram_gb": base_gb}  # fmt: skip
        try:
            for _ in range(warmup):
                cohort.step()
            sync()
            before = {s: (m.tokens, m.loss_tokens, m.step) for s, m in cohort.members.items()}
            times = []
            for _ in range(timed):
                tick = time.perf_counter()
                cohort.step()
                sync()
                times.append(time.perf_counter() - tick)
        except Exception as exc:  # OOM or a bug: the row says so, the next K still runs
            row.update(trial_status="error", error=f"{type(exc).__name__}: {str(exc)[:1000]}")
            if cuda:
                row.update(peak_vram_gb=torch.cuda.max_memory_allocated() / 2**30)
            write_row(Path(job["out"]), row)
            del exc
            for m in cohort.members.values():
                m.optimizer.zero_grad(set_to_none=True)
                m.pending, m.step_loss = [], None
            cohort.split.segments = ()
            if cuda:
                torch.cuda.empty_cache()
            continue
        seconds = sum(times)
        members = []
        for s, m in cohort.members.items():
            tokens, loss_tokens, step = (a - b for a, b in zip((m.tokens, m.loss_tokens, m.step), before[s]))
            cohort._check(m)
            members.append({"name": m.name, "rank": m.train.lora_r, "targets": m.train.target_modules, "micro_batch": m.train.batch[0],
                            "grad_accum": m.train.batch[1], "config_key": config_key(m.train.lora_r, m.train.target_modules, *m.train.batch),
                            "tokens": tokens, "tokens_per_sec": tokens / seconds, "loss_tokens": loss_tokens,
                            "optimizer_steps": step, "last_loss": m.history[-1][1] if m.history else None, "status": m.status})  # fmt: skip
        tokens = sum(m["tokens_per_sec"] for m in members) * seconds
        loss_tokens = sum(m["loss_tokens"] for m in members)
        row.update(
            trial_status="completed",
            tokens_per_sec=tokens / seconds,
            tokens_per_sec_per_member=tokens / seconds / k,
            timed_seconds=seconds,
            micro_step_seconds=seconds / timed,
            micro_step_seconds_all=[round(t, 4) for t in times],
            mfu=mfu(job["size"], tokens / seconds, loss_tokens / tokens, cuda),
            peak_vram_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            peak_vram_reserved_gb=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            peak_vram_gb_per_row=(torch.cuda.max_memory_allocated() - base_bytes) / 2**30 / rows_per_step if cuda else None,
            wall_seconds=round(time.perf_counter() - row_started, 1),
            members=members,
        )
        write_row(Path(job["out"]), row)


# ----------------------------------------------------------------------------------------------


def makespan_rows(results: list[dict], sweep_steps: int) -> list[dict]:
    """One `makespan` row per cohort row: its members' alone seconds for the same tokens (see the docstring)."""
    alone = {r["config_key"]: r for r in results if r.get("run") == "alone" and r.get("trial_status") == "completed"}
    out = []
    for c in results:
        if c.get("run") != "cohort" or c.get("trial_status") != "completed":
            continue
        members = c["members"]
        found = [m for m in members if m["config_key"] in alone]
        row = {"size": c["size"], "run": "makespan", "k": c["k"], "dropout": c["dropout"], "gradient_checkpointing": c["gradient_checkpointing"],
               "members_with_alone_row": len(found), "alone_dropout": DROPOUT, "sweep_steps": sweep_steps}  # fmt: skip
        if len(found) < len(members):
            row.update(trial_status="incomplete", missing=[m["config_key"] for m in members if m not in found])
            out.append(row)
            continue
        cohort_s = c["timed_seconds"]
        alone_s = sum(m["tokens"] / alone[m["config_key"]]["tokens_per_sec"] for m in members)
        sweep_tokens = {m["name"]: sweep_steps * m["micro_batch"] * m["grad_accum"] * SEQ for m in members}
        cohort_sweep = c["base_load_seconds"] + sum(sweep_tokens.values()) / c["tokens_per_sec"]
        alone_sweep = sum((alone[m["config_key"]].get("load_seconds") or 0) + sweep_tokens[m["name"]] / alone[m["config_key"]]["tokens_per_sec"] for m in members)
        per_row_alone = [((alone[m["config_key"]].get("peak_vram_gb") or 0) - (c.get("base_vram_gb") or 0)) / m["micro_batch"] for m in members]
        row.update(
            trial_status="completed",
            cohort_seconds=cohort_s,
            alone_seconds_same_tokens=alone_s,
            step_ratio=cohort_s / alone_s,  # the training step alone: < 1 is faster than one-at-a-time
            cohort_tokens_per_sec=c["tokens_per_sec"],
            alone_equivalent_tokens_per_sec=sum(m["tokens"] for m in members) / alone_s,
            best_alone_tokens_per_sec=max(alone[m["config_key"]]["tokens_per_sec"] for m in members),
            sweep_cohort_seconds=cohort_sweep,
            sweep_alone_seconds=alone_sweep,
            sweep_ratio=cohort_sweep / alone_sweep,  # issue 15's target: <= 0.15
            base_loads={"cohort": 1, "alone": len(members)},
            peak_vram_gb_per_row={"cohort": c.get("peak_vram_gb_per_row"), "alone_max": max(per_row_alone) if c.get("peak_vram_gb") else None,
                                  "alone_min": min(per_row_alone) if c.get("peak_vram_gb") else None},  # fmt: skip
        )
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b", help="1b, 12b or 1b,12b (one process per GPU is faster: see the docstring)")
    ap.add_argument("--workdir", default="/tmp/bench-cohort")
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no new row starts (default: per size, 320 s 1b, 430 s 12b)")
    ap.add_argument("--sweep-steps", type=int, default=400, help="optimizer steps per trial for the projected sweep makespan")
    ap.add_argument("--alone-lora-dtype", default="bfloat16", choices=["bfloat16", "float32"], help="single trials' train.lora_dtype on a GPU")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2-3 micro-steps: exercise the code paths")
    ap.add_argument("--out", required=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        (cohorts if job["kind"] == "cohort" else alone)(job)
        return

    started = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        plan = dict(PLAN[size])
        method = ARCH[size]["method"]
        budget = args.budget if args.budget is not None else plan["budget"]
        if args.dry_run:
            from trainable.tiny import ensure_tiny

            folder = ensure_tiny()
            plan.update(rows=[(3, DROPOUT, "auto"), (2, 0.0, False)], warmup=1, timed=2, alone_warmup=1, alone_timed=1,
                        members=[(r, t, min(m, 2), min(a, 2), lr) for r, t, m, a, lr in plan["members"]][:3])  # fmt: skip
        else:
            folder = work / f"gemma3-{size}"
            if not (folder / "config.json").exists():
                seconds = build_checkpoint(size, folder)
                print(f"built {size} checkpoint in {seconds:.0f} s", flush=True)
        data_dir, _ = prepare_data(folder, work / "data")
        common = {"size": size, "method": method, "model_dir": str(folder), "data_dir": data_dir, "out": str(out)}
        # every distinct member configuration alone, in the order members join cohorts
        used = plan["members"][: max(k for k, _, _ in plan["rows"])]
        configs = list({config_key(r, t, m, a): (r, t, m, a) for r, t, m, a, _ in used}.values())
        jobs = [{"kind": "cohort", "rows": plan["rows"], "members": plan["members"], "warmup": plan["warmup"], "timed": plan["timed"]}]
        jobs += [{"kind": "alone", "config": c, "warmup": plan["alone_warmup"], "timed": plan["alone_timed"], "lora_dtype": args.alone_lora_dtype} for c in configs]
        size_started = time.time()
        for job in jobs:
            if time.time() - size_started > budget:
                print(f"budget spent: {job['kind']} {job.get('config', '')} not run", flush=True)
                continue
            job.update(common, deadline=size_started + budget)
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
            for attempt in ("first", "float32") if job["kind"] == "alone" else ("first",):
                if attempt == "float32":
                    if job["lora_dtype"] == "float32":
                        break
                    print("alone with lora_dtype bfloat16 failed: again with float32", flush=True)
                    job["lora_dtype"] = "float32"
                proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", json.dumps(job)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
                if proc.returncode == 0:
                    break
                write_row(out, {"size": size, "run": job["kind"], "config": job.get("config", job.get("rows")), "trial_status": "error", "error": proc.stderr[-3000:]})
                print(proc.stderr[-1500:], flush=True)
        results = json.loads(out.read_text())["results"] if out.exists() else []
        for row in makespan_rows([r for r in results if r.get("size") == size], args.sweep_steps):
            write_row(out, row)

    results = json.loads(out.read_text())["results"] if out.exists() else []
    print(f"\n{'size':<4} {'run':<18} {'K':>3} {'drop':>5} {'ckpt':>5} {'tok/s':>9} {'tok/s/member':>12} {'step s':>7} {'peak GB':>8} {'GB/row':>7} {'MFU':>6}")
    for r in results:
        if r.get("run") == "makespan":
            continue
        if r.get("trial_status") == "error":
            print(f"{r['size']:<4} {r['run']:<8} {r.get('k', '')!s:>3} error: {r.get('error', '')[-200:]}")
            continue
        k = r.get("k", 1)
        step = r.get("micro_step_seconds", r.get("step_seconds")) or float("nan")
        peak = r.get("peak_vram_gb") or float("nan")
        per_row = r.get("peak_vram_gb_per_row") or (peak / r["micro_batch"] if r.get("micro_batch") else float("nan"))
        m = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        label = r["run"] if r["run"] == "cohort" else f"{r['rank']}/{r['targets'] if isinstance(r['targets'], str) else '+'.join(r['targets'])}/{r['micro_batch']}x{r['grad_accum']}"
        print(f"{r['size']:<4} {label:<18} {k:>3} {r.get('dropout', DROPOUT):>5} {str(r.get('gradient_checkpointing'))[:5]:>5} {r['tokens_per_sec']:>9.0f} "
              f"{r['tokens_per_sec'] / k:>12.0f} {step:>7.3f} {peak:>8.2f} {per_row:>7.2f} {m:>6}")  # fmt: skip
    print(f"\n{'size':<4} {'K':>3} {'drop':>5} {'ckpt':>5} {'step ratio':>10} {'sweep ratio':>11} {'cohort tok/s':>12} {'alone-equiv tok/s':>17} {'best alone':>10}  (ratios: cohort / one-at-a-time; target <= 0.15)")
    for r in results:
        if r.get("run") != "makespan":
            continue
        if r.get("trial_status") != "completed":
            print(f"{r['size']:<4} {r['k']:>3} {r['dropout']:>5} incomplete: no alone row for {r.get('missing')}")
            continue
        print(f"{r['size']:<4} {r['k']:>3} {r['dropout']:>5} {str(r['gradient_checkpointing'])[:5]:>5} {r['step_ratio']:>10.3f} {r['sweep_ratio']:>11.3f} "
              f"{r['cohort_tokens_per_sec']:>12.0f} {r['alone_equivalent_tokens_per_sec']:>17.0f} {r['best_alone_tokens_per_sec']:>10.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
