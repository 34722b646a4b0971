"""Where a training step's time goes, for one real-size Gemma 3 (random weights) on a GPU.

    python bench/step_profile.py --size 1b --out profile.json
    python bench/step_profile.py --dry-run --out /tmp/profile.json     # CPU, tiny model: every code path

A cohort of one (trainable/cohort.py: how every trial trains) with the seed's LoRA (r=16, alpha=16,
all linear layers, paged_adamw_8bit built by trainable.cohort.build_optimizer) on one packed
micro-batch of 1024 tokens. Times (device-synchronised, median of --repeat) its forward, its
forward+backward, its optimizer step and one whole cohort micro-step (forward, backward, gradient
clipping, optimizer, schedule), under gradient checkpointing on/off and sdpa vs eager attention;
then prints torch.profiler's top device and CPU ops for the sdpa, checkpointed case. (The earlier
packed vs plain causal batch rows are gone: the cohort always feeds packed rows with their
position ids.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import with_provenance  # noqa: E402

SEQ = 1024


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `repeat` calls after one untimed call, each from a sync to a sync."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_rows(folder: Path, data_dir: str, method: str, repeat: int) -> list[dict]:
    import torch

    from sweep.config import TrainSection
    from trainable.cohort import Cohort, build_optimizer
    from trainable.data import row_order

    rows = []
    for attn in ("sdpa", "eager"):
        # the model's own loss and fp32 LoRA: the step as it was first profiled here (before the fast step)
        base = TrainSection(method=method, attn_implementation=attn, loss="model", lora_dtype="float32", compile=False)
        cohort = Cohort(str(folder), data_dir, base, max_seq_len=SEQ, max_rows=1)
        member = TrainSection(method=method, lora_r=16, lora_alpha=16, target_modules="all-linear", optimizer="paged_adamw_8bit", batch=(1, 1), attn_implementation=attn,
                              loss="model", lora_dtype="float32", compile=False)  # fmt: skip
        slot = cohort.add(member)
        m = cohort.members[slot]
        first = [next(row_order(len(cohort.train_ds), member.seed, 0))]  # the member's first micro-batch
        tokens, loss_tokens = cohort.row_tokens[first[0]], cohort.row_loss_tokens[first[0]]
        opt = build_optimizer(m.params, member, cohort.device)  # a second one, timed apart from the member's own
        for ckpt in (True, False):
            cohort.set_checkpointing(ckpt)

            def fwd() -> None:
                # the forward a cohort step and an evaluation run (without gradients here)
                cohort._summed_losses(cohort.train_ds, {slot: first}, grad=False)

            def fwd_bwd() -> None:
                cohort.forward_backward({slot: first}, {slot: loss_tokens})

            row = {"attn": attn, "checkpointing": ckpt, "tokens": tokens, "forward_s": timed(fwd, repeat), "forward_backward_s": timed(fwd_bwd, repeat)}
            row["optimizer_step_s"] = timed(opt.step, repeat)
            row["micro_step_s"] = timed(cohort.step, repeat)  # accumulation 1: every micro-step steps the optimizer
            row["tokens_per_sec_fwd_bwd"] = tokens / row["forward_backward_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if attn == "sdpa" and ckpt:
                from torch.profiler import ProfilerActivity, profile

                cuda = torch.cuda.is_available()
                with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                    for _ in range(2):
                        fwd_bwd()
                    sync()
                print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15), flush=True)
                if cuda:
                    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
        del cohort, m, opt
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    from realsize import ARCH, build_checkpoint, prepare_data

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/gemma3-profile")
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny model instead of --size, 2 repeats: exercise the code paths")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.dry_run:
        from trainable.tiny import ensure_tiny

        folder, method, repeat = ensure_tiny(), "lora", 2
    else:
        folder, method, repeat = Path(args.workdir) / f"gemma3-{args.size}", ARCH[args.size]["method"], args.repeat
        build_checkpoint(args.size, folder)
    data_dir, _ = prepare_data(folder, Path(args.workdir) / "data")
    rows = profile_rows(folder, data_dir, method, repeat)
    Path(args.out).write_text(json.dumps(with_provenance(rows), indent=2))
    print(f"\n{'attn':<6} {'ckpt':<5} {'fwd s':>7} {'fwd+bwd s':>9} {'opt s':>7} {'step s':>7} {'tok/s':>9}")
    for r in rows:
        print(f"{r['attn']:<6} {r['checkpointing']!s:<5} {r['forward_s']:>7.3f} {r['forward_backward_s']:>9.3f} {r['optimizer_step_s']:>7.4f} "
              f"{r['micro_step_s']:>7.3f} {r['tokens_per_sec_fwd_bwd']:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
