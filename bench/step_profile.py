"""Where a training step's time goes, for one real-size Gemma 3 (random weights) on a GPU.

    python bench/step_profile.py --size 1b --out profile.json

Times (CUDA-synchronised, median of --repeat) forward, forward+backward and the optimizer step of
our trainable's model for one packed micro-batch of 1024 tokens, under variations: packed position
ids vs a plain causal batch, gradient checkpointing on/off, sdpa vs eager attention; then prints
torch.profiler's top CUDA and CPU ops for the packed, checkpointed case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import with_provenance  # noqa: E402


def timed(fn, repeat: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch

    from realsize import ARCH, build_checkpoint, prepare_data
    from sweep.config import TrainSection
    from trainable.data import load_split, train_batches
    from trainable.model import load_model
    from trainable.train import build_optimizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/gemma3-profile")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    folder = Path(args.workdir) / f"gemma3-{args.size}"
    build_checkpoint(args.size, folder)
    data_dir, ids = prepare_data(folder, Path(args.workdir) / "data")
    batch = next(train_batches(load_split(data_dir, "train"), 1, 0, 0, 0))
    dev = torch.device("cuda", 0)
    packed = {k: batch[k].to(dev) for k in ("input_ids", "labels", "position_ids")}
    plain = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    rows = []
    for attn in ("sdpa", "eager"):
        for ckpt in (True, False):
            train = TrainSection(method=ARCH[args.size]["method"], lora_r=16, lora_alpha=16, target_modules="all-linear",
                                 gradient_checkpointing=ckpt, attn_implementation=attn, optimizer="paged_adamw_8bit")  # fmt: skip
            loaded = load_model(str(folder), train, embeddings="frozen", tokens_per_micro_batch=1024)
            model = loaded.model
            opt = build_optimizer([p for p in model.parameters() if p.requires_grad], train, dev)
            n = max(batch["loss_tokens"], 1)
            for name, inputs in (("packed", packed), ("plain", plain)):
                def fwd() -> None:
                    with torch.no_grad():
                        model(**inputs, num_items_in_batch=n, use_cache=False)

                def fwd_bwd() -> None:
                    model(**inputs, num_items_in_batch=n, use_cache=False).loss.backward()

                row = {"attn": attn, "checkpointing": ckpt, "batch": name, "forward_s": timed(fwd, args.repeat), "forward_backward_s": timed(fwd_bwd, args.repeat)}
                row["optimizer_step_s"] = timed(opt.step, args.repeat)
                row["tokens_per_sec_fwd_bwd"] = batch["tokens"] / row["forward_backward_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
            if attn == "sdpa" and ckpt:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(2):
                        model(**packed, num_items_in_batch=n, use_cache=False).loss.backward()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
            del model, opt, loaded
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(with_provenance(rows), indent=2))
    print(f"\n{'attn':<6} {'ckpt':<5} {'batch':<7} {'fwd s':>7} {'fwd+bwd s':>9} {'opt s':>7} {'tok/s':>9}")
    for r in rows:
        print(f"{r['attn']:<6} {r['checkpointing']!s:<5} {r['batch']:<7} {r['forward_s']:>7.3f} {r['forward_backward_s']:>9.3f} {r['optimizer_step_s']:>7.4f} {r['tokens_per_sec_fwd_bwd']:>9.0f}")


if __name__ == "__main__":
    main()
