#!/usr/bin/env bash
# Issue 30's GPU measurements on one GPU, one after the other in one call, so every comparison is on
# the same card: the Triton LoRA products (trainable/lora_kernels.py) against commit 9b13d9d's torch
# products (the same tree with 9b13d9d's trainable/multi_lora.py), in an 8-member Gemma 3 1B cohort step (bench/packing.py's 8 seeded configurations, seq
# 1024, dropout 0.05, compiled layers, passes of at most 24,576 tokens without checkpointing), with
# HF Trainer tuned at micro-batch 32 as the anchor (liger, bf16 adapters, fused AdamW, sdpa).
# On the GPU host, from the repository root, with the staged wheels and the old layer in .whl/
# (git show 9b13d9d:trainable/multi_lora.py > .whl/old-multi_lora.py):
#   bash bench/gpu_chain_30.sh "$OUT" COMMIT
set -u
out=${1:?a folder for the results}
commit=${2:?the commit of this tree}
mkdir -p "$out" /tmp/old
cp -r core sweep trainable bench search_spaces pyproject.toml /tmp/old/
cp .whl/old-multi_lora.py /tmp/old/trainable/multi_lora.py && rm /tmp/old/trainable/lora_kernels.py
W=/tmp/w
ROW="--sizes 1b --rows 8:0.05:off --members packing --no-serial --compile --pass-tokens 24576 --budget 200 --workdir $W"
step() { echo "== $(date +%T) $*"; }
quiet() { grep -v "Saving\|Map\|it/s\]\|examples/s" | tail -n "$1"; }

step "GPU kernel tests, $commit"
python3 -m pytest tests/gpu/test_lora_kernels.py -q -p no:cacheprovider 2>&1 | tail -n 6
step "LoRA products alone"
python3 bench/lora_gemm.py --out "$out/lora-gemm.json" 2>&1 | quiet 80
step "cohort of 8, $commit (Triton products)"
LORA_SWEEP_GIT_COMMIT=$commit python3 bench/cohort.py $ROW --profile --out "$out/cohort-1b-k8-new.json" 2>&1 | quiet 6
step "cohort of 8, 9b13d9d (torch products)"
(cd /tmp/old && LORA_SWEEP_GIT_COMMIT=9b13d9d python3 bench/cohort.py $ROW --out "$out/cohort-1b-k8-old.json" 2>&1 | quiet 6)
step "HF Trainer tuned, mb 32x1"
OUT=$out timeout 200 python3 .whl/hf_trainer_tuned.py "1b-lora:bs=32,ga=1,gc=0,attn=sdpa,optim=adamw_torch_fused,emb=0,liger=1,abf16=1,steps=10" 2>&1 | grep RESULT
step "done"
