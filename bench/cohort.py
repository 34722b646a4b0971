"""Many trials, one base model (issues 15, 30): a cohort of K LoRA members against the same K trials
trained one after the other, each a cohort of one, on the same tokens.

    CUDA_VISIBLE_DEVICES=0 python bench/cohort.py --sizes 1b --out cohort-1b.json
    CUDA_VISIBLE_DEVICES=1 python bench/cohort.py --sizes 12b --out cohort-12b.json
    python bench/cohort.py --dry-run --out /tmp/cohort-dry.json                       # CPU, tiny model

Random-weight real architecture (bench/realsize.py), packed rows of 1024 tokens, frozen embeddings,
sdpa, the worker's fast-step settings (trainable.cohort_worker.resolve_auto: the liger loss where
CUDA runs and liger-kernel is installed, else the chunked loss; bf16 LoRA on the bf16 base), LoRA
dropout 0.05 (one row 0.0), gradient checkpointing auto (one row off). One process per size loads
the base model once and every row trains on it (members are removed and added between rows: the
base is never reloaded). Per row (K, dropout, checkpointing), most important first:
- `cohort`: K mixed members (ranks 8-64, different targets, micro-batches 1-8, accumulation so that
  every member steps a whole number of times in the timed window). After --warmup untimed
  micro-steps, --timed micro-steps are timed, each from a device sync to a device sync: tokens/s in
  all and per member, micro-step time, peak memory (allocated and reserved since the row began), MFU.
- `serial`: the same K members (same configurations, same seeds), one after the other, each alone
  in the cohort: a cohort of one, as a sweep with resources.cohort 1 trains them on its one loaded
  base. Each takes the same warm-up and timed micro-steps. A member's micro-batches depend on it
  alone (its seed's data order; core.rules.cohort_fold), so alone it trains on exactly the tokens it
  trained on in the cohort (checked per member: `same_tokens`). Its seconds, tokens/s, checkpointing
  (auto decides for its own rows) and peak memory.
- `compare` (one per row, written last): the cohort's timed seconds against the sum of the serial
  members' timed seconds, same tokens: `step_ratio` = cohort / one at a time (< 1: the cohort is
  faster), `speedup` its inverse, and the cohort's tokens/s beside the best member's alone (issue
  30: a cohort step at the speed of one big batch).
MFU uses bench/seed_vs_ours.py's FLOPs per token (frozen linears 4x, attention, lm_head on the reply
tokens; LoRA's own FLOPs and recomputation not counted) over the H200's dense bf16 peak. Every row
is written to --out as soon as it finishes, with provenance (bench/provenance.py); a run cut short
keeps what finished. --budget stops starting new rows (and new serial members) once that many
seconds have passed; a serial row cut short leaves its compare row `incomplete`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import with_provenance  # noqa: E402
from realsize import ARCH, build_checkpoint, prepare_data  # noqa: E402
from seed_vs_ours import PEAK_FLOPS, KernelProfile, flops_per_token  # noqa: E402
from sweepbench import seeded_configs  # noqa: E402

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
# per size: rows (K, dropout, gradient checkpointing), most important first; micro-steps warm-up /
# timed (the cohort and each serial member alike); the default --budget (no new row or member after it:
# a guess, not yet timed on a GPU with the serial rows, which take about as long as their cohort rows and more)
PLAN = {
    "1b": {"rows": [(16, DROPOUT, "auto"), (16, 0.0, "auto"), (16, DROPOUT, False), (8, DROPOUT, "auto"), (4, DROPOUT, "auto")],
           "members": MEMBERS_1B, "warmup": 3, "timed": 8, "budget": 480},
    "12b": {"rows": [(8, DROPOUT, "auto"), (8, 0.0, "auto"), (8, DROPOUT, False), (4, DROPOUT, "auto")],
            "members": MEMBERS_12B, "warmup": 2, "timed": 4, "budget": 540},
}  # fmt: skip

def packing_members(size: str, k: int) -> list[tuple]:
    """bench/packing.py's seeded configurations (its 1B sweep's first `k` trials: ranks 8-64, alpha 1-2x
    rank, attention or all-linear, micro-batch x accumulation = 8 sequences per step), as member specs.
    The sixth element is lora_alpha's ratio to the rank (the mixed members' specs leave it out: 2)."""
    from packing import SIZES

    _, _, ranks, pairs = SIZES[size]
    points = seeded_configs(k, seed=0, ranks=ranks, ratios=[1, 2], targets=["attention", "all-linear"], lr=(5e-5, 1e-3), pairs=pairs)
    return [(p["lora_r"], p["target_modules"], p["batch"][0], p["batch"][1], p["learning_rate"], p["lora_alpha_ratio"]) for p in points]


STEPS = 1000  # each member's max_steps: never reached (a row ends after its micro-steps); it shapes the LR schedule only


def config_key(rank: int, targets: Any, micro: int, accum: int) -> str:
    return json.dumps([rank, list(targets) if isinstance(targets, (list, tuple)) else targets, micro, accum])


def member_train(spec: tuple, seed: int, method: str, dropout: float = DROPOUT) -> Any:
    from sweep.config import TrainSection

    r, targets, micro, accum, lr, *ratio = spec
    targets = tuple(targets) if isinstance(targets, list) else targets
    return TrainSection(method=method, lora_r=r, lora_alpha=(ratio[0] if ratio else 2) * r, lora_dropout=dropout, target_modules=targets, learning_rate=lr,
                        batch=(micro, accum), max_steps=STEPS, eval_every=STEPS, log_every=STEPS, seed=seed, warmup_ratio=0.1)  # fmt: skip


def write_row(out: Path, row: dict) -> None:
    """Append a row to the JSON results file (atomically: a kill leaves the previous version)."""
    rows = json.loads(out.read_text())["results"] if out.exists() else []
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(with_provenance(rows + [row]), indent=2))
    tmp.replace(out)
    print(json.dumps({k: v for k, v in row.items() if k not in ("members", "error", "profile")})[:600], flush=True)


def mfu(size: str, tokens_per_sec: float, lm_head_fraction: float, cuda: bool) -> float | None:
    return flops_per_token(size, lm_head_fraction, False) * tokens_per_sec / PEAK_FLOPS if cuda else None


# ----------------------------------------------------------------------------------------------
# one size, in its own process: the base loaded once, every row on it


class Bench:
    """The loaded base (a Cohort) and the timing of micro-steps on it."""

    def __init__(self, job: dict):
        import torch

        from sweep.config import TrainSection
        from trainable.cohort import Cohort
        from trainable.cohort_worker import resolve_auto

        self.job, self.torch = job, torch
        self.cuda = torch.cuda.is_available()
        torch.set_num_threads(8)
        # the settings a sweep's worker would train with here (liger or chunked loss, bf16 or fp32 LoRA)
        base, self.reasons = resolve_auto(TrainSection(method=job["method"]), self.cuda)
        if job.get("compile"):
            base = base.model_copy(update={"compile": True})
        started = time.perf_counter()
        fold = {"fold_tokens": job["fold_tokens"]} if job.get("fold_tokens") is not None else {}  # default: core.rules.COHORT_FOLD_TOKENS
        self.cohort = Cohort(job["model_dir"], job["data_dir"], base, max_seq_len=SEQ, **fold)
        self.load_seconds = time.perf_counter() - started
        self.base_bytes = torch.cuda.memory_allocated() if self.cuda else 0
        self.warmup_seconds: list[float] = []

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def clear(self) -> None:
        """Every member out (their adapters and optimizer state freed); the base stays."""
        for slot in list(self.cohort.members):
            self.cohort.remove(slot)
        self.cohort.split.segments = ()  # a step that raised may leave its rows' layout behind
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def start(self, members: list[tuple[int, Any]], checkpointing: Any) -> bool:
        """Add `members` ([(index, TrainSection)]) and decide gradient checkpointing as a worker does
        for them (`checkpointing`: True, False or auto, over the rows one micro-step holds)."""
        for i, train in members:
            self.cohort.add(train, name=f"m{i}")
        self.cohort.base_train = self.cohort.base_train.model_copy(update={"gradient_checkpointing": checkpointing})
        self.cohort.pass_tokens = self.job.get("pass_tokens")
        if self.cohort.pass_tokens:  # passes of at most that many tokens, each freed by its backward: checkpointing over one pass
            return self.cohort.plan_checkpointing(min(self.rows_per_micro_step(), max(1, self.cohort.pass_tokens // SEQ)))
        return self.cohort.plan_checkpointing(self.rows_per_micro_step())

    def rows_per_micro_step(self) -> int:
        from core.rules import cohort_fold

        return sum(m.train.batch[0] * cohort_fold(*m.train.batch, SEQ, self.cohort.fold_tokens) for m in self.cohort.members.values())

    def run(self) -> tuple[list[float], dict[int, tuple[int, int, int]]]:
        """--warmup untimed micro-steps, then --timed ones, each timed from a sync to a sync.
        Returns the timed micro-steps' seconds and each member's (tokens, loss tokens, steps) in them.
        The warm-up micro-steps' seconds (compiled layers compile in them) are kept in
        `warmup_seconds`: a compiled run's against an eager one's is the compile's cost."""
        self.warmup_seconds = []
        for _ in range(self.job["warmup"]):
            tick = time.perf_counter()
            self.cohort.step()
            self.sync()
            self.warmup_seconds.append(time.perf_counter() - tick)
        before = {s: (m.tokens, m.loss_tokens, m.step) for s, m in self.cohort.members.items()}
        times = []
        for _ in range(self.job["timed"]):
            tick = time.perf_counter()
            self.cohort.step()
            self.sync()
            times.append(time.perf_counter() - tick)
        done = {}
        for s, m in self.cohort.members.items():
            self.cohort.sync(s)  # the losses reach the host: a non-finite one shows in the member's status
            done[s] = tuple(a - b for a, b in zip((m.tokens, m.loss_tokens, m.step), before[s]))
        return times, done

    def profile(self) -> dict:
        """torch.profiler over --timed more micro-steps: GPU kernel time by kind, the top kernels."""
        profiler = KernelProfile(0, self.job["timed"])
        step = profiler.around(self.cohort.step)
        for _ in range(self.job["timed"]):
            step()
        return profiler.summary()

    def lm_head_fraction(self, tokens: int, loss_tokens: int) -> float:
        return 1.0 if self.cohort.base_train.loss == "model" else loss_tokens / max(tokens, 1)

    def peaks(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"peak_vram_gb": None, "peak_vram_reserved_gb": None}
        return {"peak_vram_gb": self.torch.cuda.max_memory_allocated() / 2**30, "peak_vram_reserved_gb": self.torch.cuda.max_memory_reserved() / 2**30}


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:1000]}"


def size_job(job: dict) -> None:
    """Every row of one size: the cohort, its members one after the other, the comparison."""
    bench = Bench(job)
    out, size, method, deadline = Path(job["out"]), job["size"], job["method"], job["deadline"]
    common = {"size": size, "loss": bench.cohort.base_train.loss, "lora_dtype": bench.cohort.base_train.lora_dtype, "compiled_layers": bench.cohort.compiled_layers,
              "pass_tokens": job.get("pass_tokens"), "fold_tokens": job.get("fold_tokens"),
              "base_load_seconds": round(bench.load_seconds, 1), "base_vram_gb": bench.base_bytes / 2**30 if bench.cuda else None}  # fmt: skip
    for k, dropout, checkpointing in job["rows"]:
        if time.time() > deadline:
            print(f"budget spent: K={k} dropout={dropout} checkpointing={checkpointing} not run", flush=True)
            break
        members = [(i, member_train(job["members"][i % len(job["members"])], seed=i, method=method, dropout=dropout)) for i in range(k)]
        what = {**common, "k": k, "dropout": dropout, "checkpointing_setting": checkpointing, "warmup_micro_steps": job["warmup"], "timed_micro_steps": job["timed"]}
        cohort_row = cohort_run(bench, what, members, profile=job.get("profile", False))
        write_row(out, cohort_row)
        if cohort_row["trial_status"] != "completed" or not job.get("serial", True):
            continue  # nothing to compare against, or not asked to
        serial_row = serial_run(bench, what, members, deadline)
        write_row(out, serial_row)
        write_row(out, compare(cohort_row, serial_row))


def cohort_run(bench: Bench, what: dict, members: list[tuple[int, Any]], profile: bool = False) -> dict:
    """The K members in one cohort. With `profile`, the timed micro-steps run a second time under
    torch.profiler (after the timed ones: the profiler's overhead never touches the figures)."""
    started = time.perf_counter()
    bench.clear()
    row = {**what, "run": "cohort"}
    try:
        row["gradient_checkpointing"] = bench.start(members, what["checkpointing_setting"])
        row["rows_per_micro_step"] = bench.rows_per_micro_step()
        times, done = bench.run()
        if profile:
            row["profile"] = bench.profile()
    except Exception as exc:  # OOM or a bug: the row says so, the next row still runs
        row.update(trial_status="error", error=error_text(exc), **bench.peaks())
        bench.clear()
        return row
    seconds = sum(times)
    rows = []
    for s, m in bench.cohort.members.items():
        tokens, loss_tokens, steps = done[s]
        rows.append({"name": m.name, "rank": m.train.lora_r, "targets": m.train.target_modules, "micro_batch": m.train.batch[0],
                     "grad_accum": m.train.batch[1], "config_key": config_key(m.train.lora_r, m.train.target_modules, *m.train.batch),
                     "tokens": tokens, "loss_tokens": loss_tokens, "tokens_per_sec": tokens / seconds, "optimizer_steps": steps,
                     "last_loss": m.history[-1][1] if m.history else None, "status": m.status})  # fmt: skip
    tokens, loss_tokens = sum(r["tokens"] for r in rows), sum(r["loss_tokens"] for r in rows)
    peaks = bench.peaks()
    row.update(
        trial_status="completed",
        tokens=tokens,
        tokens_per_sec=tokens / seconds,
        tokens_per_sec_per_member=tokens / seconds / len(rows),
        timed_seconds=seconds,
        micro_step_seconds=seconds / len(times),
        micro_step_seconds_all=[round(t, 4) for t in times],
        warmup_seconds_all=[round(t, 4) for t in bench.warmup_seconds],
        mfu=mfu(what["size"], tokens / seconds, bench.lm_head_fraction(tokens, loss_tokens), bench.cuda),
        **peaks,
        peak_vram_gb_per_row=(peaks["peak_vram_gb"] - what["base_vram_gb"]) / row["rows_per_micro_step"] if bench.cuda else None,
        wall_seconds=round(time.perf_counter() - started, 1),
        members=rows,
    )
    return row


def serial_run(bench: Bench, what: dict, members: list[tuple[int, Any]], deadline: float) -> dict:
    """The same members one after the other, each a cohort of one, for the same micro-steps."""
    started = time.perf_counter()
    row = {**what, "run": "serial", "members": []}
    for i, train in members:
        if time.time() > deadline:
            row.update(trial_status="incomplete", reason=f"budget spent after {len(row['members'])} of {len(members)} members")
            break
        bench.clear()
        one = {"name": f"m{i}", "rank": train.lora_r, "targets": train.target_modules, "micro_batch": train.batch[0], "grad_accum": train.batch[1],
               "config_key": config_key(train.lora_r, train.target_modules, *train.batch)}  # fmt: skip
        try:
            one["gradient_checkpointing"] = bench.start([(i, train)], what["checkpointing_setting"])
            times, done = bench.run()
        except Exception as exc:
            one.update(status="error", error=error_text(exc), **bench.peaks())
            row["members"].append(one)
            row.update(trial_status="error", error=f"member m{i}: {one['error']}")
            break
        (tokens, loss_tokens, steps), m = next(iter(done.values())), next(iter(bench.cohort.members.values()))
        one.update(tokens=tokens, loss_tokens=loss_tokens, seconds=sum(times), tokens_per_sec=tokens / sum(times), optimizer_steps=steps,
                   micro_step_seconds=sum(times) / len(times), last_loss=m.history[-1][1] if m.history else None, status=m.status,
                   mfu=mfu(what["size"], tokens / sum(times), bench.lm_head_fraction(tokens, loss_tokens), bench.cuda), **bench.peaks())  # fmt: skip
        row["members"].append(one)
    bench.clear()
    if "trial_status" not in row:
        seconds = sum(one["seconds"] for one in row["members"])
        tokens = sum(one["tokens"] for one in row["members"])
        peaks = [one["peak_vram_gb"] for one in row["members"] if one.get("peak_vram_gb") is not None]
        row.update(trial_status="completed", tokens=tokens, timed_seconds=seconds, tokens_per_sec=tokens / seconds, micro_step_seconds=seconds / (len(members) * bench.job["timed"]),
                   peak_vram_gb=max(peaks) if peaks else None)  # fmt: skip
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    return row


def compare(cohort_row: dict, serial_row: dict) -> dict:
    """The cohort against its members one at a time, on the same tokens."""
    row = {k: cohort_row[k] for k in ("size", "k", "dropout", "checkpointing_setting", "loss", "lora_dtype")}
    row.update(run="compare", gradient_checkpointing=cohort_row["gradient_checkpointing"])
    if serial_row["trial_status"] != "completed":
        return {**row, "trial_status": "incomplete", "reason": f"the serial row is {serial_row['trial_status']}: {serial_row.get('reason') or serial_row.get('error', '')}"[:500]}
    alone = {one["name"]: one for one in serial_row["members"]}
    different = [m["name"] for m in cohort_row["members"] if alone[m["name"]]["tokens"] != m["tokens"]]
    row.update(
        trial_status="completed",
        same_tokens=not different,  # False would make the ratio meaningless: it says which members differ
        tokens_differ=different,
        cohort_seconds=cohort_row["timed_seconds"],
        serial_seconds=serial_row["timed_seconds"],
        step_ratio=cohort_row["timed_seconds"] / serial_row["timed_seconds"],  # < 1: faster than one at a time
        speedup=serial_row["timed_seconds"] / cohort_row["timed_seconds"],
        cohort_tokens_per_sec=cohort_row["tokens_per_sec"],
        serial_tokens_per_sec=serial_row["tokens_per_sec"],
        best_alone_tokens_per_sec=max(one["tokens_per_sec"] for one in serial_row["members"]),
        peak_vram_gb={"cohort": cohort_row.get("peak_vram_gb"), "serial_max": serial_row.get("peak_vram_gb")},
    )
    return row


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b", help="1b, 12b or 1b,12b (one process per GPU is faster: see the docstring)")
    ap.add_argument("--workdir", default="/tmp/bench-cohort")
    ap.add_argument("--budget", type=float, default=None, help="seconds per size after which no new row or serial member starts (default: 480 s 1b, 540 s 12b)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 1 + 2 micro-steps: exercise the code paths")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default=None, help="K:dropout:checkpointing,... (e.g. 8:0.05:auto,8:0:auto) instead of the size's default rows")
    ap.add_argument("--members", choices=("mixed", "packing"), default="mixed",
                    help="mixed: the size's mixed members (micro-batches 1-8); packing: bench/packing.py's seeded configurations")
    ap.add_argument("--no-serial", action="store_true", help="the cohort rows only (no one-at-a-time rows, no compare rows)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed micro-steps before the timed ones (default: the size's; more with --compile: the passes' shapes compile)")
    ap.add_argument("--compile", action="store_true", help="compiled decoder layers (train.compile: true) in every row")
    ap.add_argument("--fold-tokens", type=int, default=None, help="most tokens of a member's micro-batches one forward folds together "
                    "(default: core.rules.COHORT_FOLD_TOKENS; 0: one micro-batch per forward): with --pass-tokens, forwards small enough to skip checkpointing")
    ap.add_argument("--pass-tokens", type=int, default=None, help="split each cohort micro-step into forward passes of at most this many tokens "
                    "(a sweep's worker decides it from memory: core.estimate.CohortBudget.step_plan); checkpointing auto then decides over one pass")
    ap.add_argument("--profile", action="store_true", help="each cohort row also runs its timed micro-steps again under torch.profiler")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        size_job(json.loads(args.one))
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        plan = dict(PLAN[size])
        budget = args.budget if args.budget is not None else plan["budget"]
        if args.dry_run:
            from trainable.tiny import ensure_tiny

            folder = ensure_tiny()
            plan.update(rows=[(3, DROPOUT, "auto"), (2, 0.0, False)], warmup=1, timed=2,
                        members=[(r, t, min(m, 2), min(a, 2), lr) for r, t, m, a, lr in plan["members"]][:3])  # fmt: skip
        else:
            folder = work / f"gemma3-{size}"
            if not (folder / "config.json").exists():
                seconds = build_checkpoint(size, folder)
                print(f"built {size} checkpoint in {seconds:.0f} s", flush=True)
        if args.warmup is not None:
            plan["warmup"] = args.warmup
        if args.rows:
            plan["rows"] = [parse_row(text) for text in args.rows.split(",")]
        if args.members == "packing":
            plan["members"] = packing_members("tiny" if args.dry_run else size, max(k for k, _, _ in plan["rows"]))
        data_dir, _ = prepare_data(folder, work / "data")
        job = {"size": size, "method": ARCH[size]["method"], "model_dir": str(folder), "data_dir": data_dir, "out": str(out), "deadline": time.time() + budget,
               "rows": plan["rows"], "members": plan["members"], "warmup": plan["warmup"], "timed": plan["timed"], "serial": not args.no_serial, "profile": args.profile, "compile": args.compile, "pass_tokens": args.pass_tokens, "fold_tokens": args.fold_tokens}  # fmt: skip
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", json.dumps(job)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:  # the process died (not a row's own failure: those are error rows)
            write_row(out, {"size": size, "run": "size", "trial_status": "error", "error": proc.stderr[-3000:]})
            print(proc.stderr[-1500:], flush=True)
    summary(json.loads(out.read_text())["results"] if out.exists() else [])


def parse_row(text: str) -> tuple[int, float, Any]:
    """`K:dropout:checkpointing` (checkpointing: auto, on or off) as a row of PLAN."""
    try:
        k, dropout, checkpointing = text.split(":")
        return int(k), float(dropout), {"auto": "auto", "on": True, "off": False}[checkpointing]
    except (ValueError, KeyError):
        raise SystemExit(f"--rows: {text!r} is not K:dropout:checkpointing (e.g. 8:0.05:auto; checkpointing auto, on or off)") from None


def summary(results: list[dict]) -> None:
    nan = float("nan")
    print(f"\n{'size':<4} {'run':<7} {'K':>3} {'drop':>5} {'ckpt':>5} {'tok/s':>9} {'tok/s/member':>12} {'step s':>7} {'peak GB':>8} {'MFU':>6}")
    for r in results:
        if r.get("run") not in ("cohort", "serial"):
            continue
        if r.get("trial_status") != "completed":
            print(f"{r['size']:<4} {r['run']:<7} {r.get('k', '')!s:>3} {r.get('trial_status')}: {(r.get('error') or r.get('reason') or '')[-200:]}")
            continue
        step = r.get("micro_step_seconds", nan)
        peak = r.get("peak_vram_gb") or nan
        m = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        print(f"{r['size']:<4} {r['run']:<7} {r['k']:>3} {r['dropout']:>5} {str(r.get('gradient_checkpointing', '-'))[:5]:>5} {r['tokens_per_sec']:>9.0f} "
              f"{r['tokens_per_sec'] / r['k']:>12.0f} {step:>7.3f} {peak:>8.2f} {m:>6}")  # fmt: skip
    for r in results:
        if r.get("profile"):
            prof = r["profile"]
            print(f"{r['size']} K={r['k']} dropout={r['dropout']} profile: busy {prof.get('busy_fraction')}, by kind (s): {prof.get('by_kind_seconds')}")
    print(f"\n{'size':<4} {'K':>3} {'drop':>5} {'ckpt':>5} {'step ratio':>10} {'speedup':>8} {'cohort tok/s':>12} {'serial tok/s':>12} {'best alone':>10} {'same tokens':>11}  (ratio: cohort / one at a time)")
    for r in results:
        if r.get("run") != "compare":
            continue
        if r.get("trial_status") != "completed":
            print(f"{r['size']:<4} {r['k']:>3} {r['dropout']:>5} incomplete: {r.get('reason', '')}")
            continue
        print(f"{r['size']:<4} {r['k']:>3} {r['dropout']:>5} {str(r['gradient_checkpointing'])[:5]:>5} {r['step_ratio']:>10.3f} {r['speedup']:>8.2f} "
              f"{r['cohort_tokens_per_sec']:>12.0f} {r['serial_tokens_per_sec']:>12.0f} {r['best_alone_tokens_per_sec']:>10.0f} {str(r['same_tokens']):>11}")  # fmt: skip


if __name__ == "__main__":
    main()
