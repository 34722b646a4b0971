#!/usr/bin/env bash
# Issue 29's GPU measurements on one GPU, one after the other, today's code beside commit 2a4a88a's
# (the last before one engine), so each comparison is on the same card in the same call:
#   1. a cohort of one against the lone trial of 2a4a88a at the same settings (Gemma 3 1B LoRA,
#      seq 1024, 32 sequences a step, bf16 LoRA, liger loss, compiled layers, sdpa, no checkpointing,
#      fused AdamW, frozen embeddings; micro-batch 16x2 and 32x1): bench/seed_vs_ours.py;
#   2. the 8 x 1B x 60-step sweep: 2a4a88a's packed default against today's default sweep:
#      bench/packing.py.
# On the GPU host, from the repository root, with the staged wheels and 2a4a88a's files in .whl/
# (git archive 2a4a88a core sweep trainable pyproject.toml search_spaces bench/*.py | gzip > .whl/old-2a4a88a.tar.gz):
#   bash .whl/on-gpu setup && bash .whl/on-gpu start 0 chain29 bash bench/gpu_chain_29.sh /tmp/runs/chain29 COMMIT
#   bash .whl/on-gpu wait 540 "$OUT"      # then again in the next call until it ends
set -u
out=${1:?a folder for the results}
commit=${2:?the commit of this tree}
mkdir -p "$out" /tmp/old /tmp/new
tar -xzf .whl/old-2a4a88a.tar.gz -C /tmp/old
cp -r core sweep trainable bench search_spaces pyproject.toml /tmp/new/  # the next call replaces the working tree
W=/tmp/w  # one 1B checkpoint for every run
ROWS="ours: mb 16x2, sdpa, ckpt off, torch fused AdamW, emb frozen, LoRA bf16, liger loss, compiled layers|ours: mb 32x1, sdpa, ckpt off, torch fused AdamW, emb frozen, LoRA bf16, liger loss, compiled layers"
step() { echo "== $(date +%T) $*"; }

step "lone trial, 2a4a88a"
(cd /tmp/old && LORA_SWEEP_GIT_COMMIT=2a4a88a python3 bench/seed_vs_ours.py --sizes 1b --workdir $W --budget-s 400 --only "$ROWS" --out "$out/svo-1b-lone-2a4a88a.json")
step "cohort of one, $commit"
(cd /tmp/new && LORA_SWEEP_GIT_COMMIT=$commit python3 bench/seed_vs_ours.py --sizes 1b --workdir $W --budget-s 400 --only "$ROWS" --out "$out/svo-1b-cohort-of-one.json")
step "packed default, 2a4a88a"
(cd /tmp/old && LORA_SWEEP_GIT_COMMIT=2a4a88a python3 bench/packing.py --size 1b --trials 8 --steps 60 --modes packed --budget 480 --workdir $W --out "$out/pack-1b-packed-2a4a88a.json")
step "default sweep, $commit"
(cd /tmp/new && LORA_SWEEP_GIT_COMMIT=$commit python3 bench/packing.py --size 1b --trials 8 --steps 60 --modes default --reference "$out/pack-1b-packed-2a4a88a.json" --budget 420 --workdir $W --out "$out/pack-1b-default.json")
step "GPU tests, $commit"
cp -r tests /tmp/new/ && (cd /tmp/new && python3 -m pytest tests/gpu -q -p no:cacheprovider -k "not qlora and not policies" 2>&1 | tail -15)  # bitsandbytes stays out of the carried wheels (their 64 MiB limit): no QLoRA here
step "done"
