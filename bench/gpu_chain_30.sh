#!/usr/bin/env bash
# Issue 30's GPU measurements on one GPU, one after the other in one call, so every comparison is on
# the same card: liger's fused lm_head + cross-entropy in chunks of ~2048 tokens (trainable/fast.py
# LIGER_CHUNK_TOKENS) against liger's own sizing (~230 chunks a call: commit 9b13d9d's
# trainable/fast.py in the same tree), in
#   1. an 8-member Gemma 3 1B cohort step (bench/packing.py's 8 seeded configurations, seq 1024,
#      dropout 0.05, compiled layers, passes of at most 24,576 tokens without checkpointing);
#   2. a cohort of one at micro-batch 32 (bench/seed_vs_ours.py's fast row);
# and HF Trainer tuned at micro-batch 32 as the anchor (liger, bf16 adapters, fused AdamW, sdpa;
# ../shared/measurements/2026-12-06-h100/hf_trainer_tuned.py, copied into .whl/).
# On the GPU host, from the repository root, with the staged wheels and the old files in .whl/old/
# (mkdir -p .whl/old/trainable && git show 9b13d9d:trainable/fast.py > .whl/old/trainable/fast.py):
#   bash bench/gpu_chain_30.sh "$OUT" COMMIT OLD_COMMIT [STEPS]      # STEPS: any of k8 mb32 hf (default: all)
# Fourth call: OLD_COMMIT 57d722b, .whl/old/ holding its trainable/cohort.py and trainable/data.py
# (training rows padded to their longest, not to max_seq_len), STEPS k8.
# Fifth call (twelfth session): OLD_COMMIT 700a74a, .whl/old/ holding its trainable/multi_lora.py
# (dropout masks drawn by torch's bernoulli and multiplied in: trainable/dropout.py's kernel against
# them), STEPS "test k8 mb32 hf" (test: the dropout kernel's GPU test first).
# Sixth call: STEPS "sweep 12b", in the background from a copy of the tree in /tmp (.whl/on-gpu):
#   sweep: bench/packing.py's 8 seeded 1B trials x 60 steps: our default sweep, the same trials one
#          at a time with HF Trainer tuned (mode hf), and one at a time on our engine (serial);
#   12b:   a 12B QLoRA cohort of 4 (packing's 12B configurations), compiled layers, profiled; it
#          waits (up to 5 min) for bitsandbytes in /tmp/site (carried by the next call).
# Thirteenth session, first call: STEPS "hfsmall 12b", the wheels without ray and with bitsandbytes
# carried (.whlq/, linked as .whl on the host):
#   hfsmall: HF Trainer tuned at micro-batches 1x8 and 2x4, liger on and off (its best switch there).
# Second call: OLD_COMMIT 69d9396, .whl/old/ holding its trainable/{multi_lora,dropout,dropout_kernel}.py
# (the base projection and the members' updates as two autograd nodes; bf16 weight gradients cast to
# fp32), STEPS "test k8 bigpass hf qlorapass mb32":
#   bigpass:   the 8-member cohort with passes of at most 32,768 tokens;
#   qlorapass: the 12B QLoRA cohort of 4 without checkpointing, in passes of 4,096 and 8,192 tokens.
# (bea51ec was reverted after that call: bench/BENCH.md.) The carried wheels for a call that needs
# bitsandbytes (the 64 MiB carry limit: everything staged but ray, plus the bitsandbytes wheel),
# made here once per session and carried as .whlq (link it as .whl on the host):
#   mkdir -p .whlq/old/trainable && for f in .whl/*.whl; do case $f in *ray-*) ;; *) ln -f $f .whlq/;; esac; done
#   cp .whlbnb/*.whl .whl/on-gpu .whl/hf_trainer_tuned.py .whlq/; echo /.whlq/ >> .git/info/exclude
# The fourteenth session had no device time (205 s left of the budget: no machine could start).
# Fifteenth session (one call, commit 6d64543, .whlq carried): hfcompile and hfmid ran (bench/BENCH.md);
# sweepfair did not (.whlq has no ray: it now skips with that message), qlorafold and k8 were not
# reached (the device budget: seven starts found no machine first).
# Ready for the next session: sweepfair first (HF's liger from micro-batch 8: hf_serial.LIGER_FROM,
# measured), with ray, i.e. .whl carried (~11 min, one background run, collected by the next call):
#   rm -rf /tmp/repo && cp -r . /tmp/repo && cd /tmp/repo && bash .whl/on-gpu setup \
#   && bash .whl/on-gpu start 0 c30 bash bench/gpu_chain_30.sh /tmp/res COMMIT bea51ec sweepfair \
#   && bash .whl/on-gpu wait 540 $OUT; cp -r /tmp/res $OUT/          # next call: cd /tmp/repo && bash .whl/on-gpu wait 540 $OUT; cp -r /tmp/res $OUT/
# then, with .whlq carried (bitsandbytes) and linked as .whl:
#   qlorafold: the 12B QLoRA cohort of 4 without checkpointing in 4,096-token forwards;
#   k8:        the one-node projection (bea51ec, .whl/old/) again, second this time (its first
#              comparison ran it first and it lost; it stays reverted unless it wins here too).
# Sixteenth session: no device time used for a measurement: fourteen starts (00:52-02:09) found no
# machine, ~90 s each, until too little of the budget was left for the sweep. SWEEP_STEPS (default 60)
# sets sweepfair's steps a trial, for a budget too short for 60; the measurement wanted is at 60.
# New step: compilepay: the 8-member cohort eager and compiled, warm-ups timed: the compile's cost
#   over the step's gain, for core.rules.COMPILE_PAYS_AFTER_S (set from the audited, wrong gains).
# The plan for the next session: STEPS "sweepfair compilepay qlorafold" in one background run (they
# run in that order), .whl carried by the first call and .whlq by the second, which installs
# bitsandbytes (qlorafold waits for it) while sweepfair runs:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whlq/bitsandbytes-*.whl
# Seventeenth session: no machine again: fourteen starts (04:01-05:14, H100 and H200) found none, ~90 s
# each, until too little of the budget was left to start one. The plan stands. The first call's form
# that brings back whatever finished if the device budget cuts the call (packing.py writes its JSON
# after each mode; the loop copies it into $OUT every 15 s):
#   rm -rf /tmp/repo && cp -r . /tmp/repo && cd /tmp/repo && bash .whl/on-gpu setup \
#   && bash .whl/on-gpu start 0 c30 bash bench/gpu_chain_30.sh /tmp/res COMMIT bea51ec "sweepfair compilepay qlorafold" \
#   && (while sleep 15; do mkdir -p $OUT/res $OUT/runs; cp -r /tmp/res/. $OUT/res/; cp /tmp/runs/*.log $OUT/runs/; done 2>/dev/null) & \
#   sleep 5; cd /tmp/repo && bash .whl/on-gpu wait 520 $OUT; mkdir -p $OUT/res; cp -r /tmp/res/. $OUT/res/
# Nineteenth session (bench/BENCH.md, its section): host 1 ran "sweepfair compilepay qlorafold" (the
# first call carried .whl without bitsandbytes: ray, bitsandbytes and the tree together pass the
# 64 MiB carry; the second carried bitsandbytes alone), host 2 "12b qlorafold swcompile" (the first
# call carried the wheels without ray but with bitsandbytes, the second ray's wheel alone).
# swcompile: the default sweep eager, then compiled, to test COMPILE_PAYS_AFTER_S in a real sweep.
# Steps of the fourteenth session's plan that ran in the fifteenth:
#   hfmid:     HF's liger switch at micro-batches 4 and 8;
#   hfcompile: HF Trainer tuned with torch_compile at mb 32 and 8 beside the same without (issue 30 item 2).
set -u
out=${1:?a folder for the results}
commit=${2:?the commit of this tree}
old=${3:?the commit whose files .whl/old/ holds}
steps=${4:-k8 mb32 hf}
mkdir -p "$out" /tmp/old
cp -r core sweep trainable bench search_spaces pyproject.toml /tmp/old/
cp -r .whl/old/. /tmp/old/
W=/tmp/w
K8="--sizes 1b --rows 8:0.05:off --members packing --no-serial --compile --warmup 6 --pass-tokens 24576 --budget 200 --workdir $W"
MB32="ours: mb 32x1, sdpa, ckpt off, torch fused AdamW, emb frozen, LoRA bf16, liger loss, compiled layers"
step() { echo "== $(date +%T) $*"; }
quiet() { grep -v "Saving\|Map\|it/s\]\|examples/s" | tail -n "$1"; }
# a package a later call may carry (the 64 MiB carry holds ray or bitsandbytes, not both): wait up to $2 x 5 s for it
wait_import() { for _ in $(seq "$2"); do python3 -c "import $1" 2>/dev/null && return; sleep 5; done; }

if [[ $steps == *test* ]]; then
  step "the GPU tests (the dropout kernel against its reference, the trials on CUDA, LoRA and QLoRA)"
  python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -n 8
fi
if [[ $steps == *k8* ]]; then
  step "cohort of 8, $commit"
  LORA_SWEEP_GIT_COMMIT=$commit python3 bench/cohort.py $K8 --profile --out "$out/cohort-1b-k8-new.json" 2>&1 | quiet 4
  step "cohort of 8, $old's files"
  (cd /tmp/old && LORA_SWEEP_GIT_COMMIT=$old python3 bench/cohort.py $K8 --out "$out/cohort-1b-k8-old.json" 2>&1 | quiet 4)
fi
if [[ $steps == *mb32* ]]; then
  step "cohort of one, mb 32, $commit"
  LORA_SWEEP_GIT_COMMIT=$commit python3 bench/seed_vs_ours.py --sizes 1b --workdir $W --budget-s 200 --only "$MB32" --out "$out/svo-1b-mb32-new.json" 2>&1 | grep -E "^1b  " | tail -n 3
  step "cohort of one, mb 32, $old's files"
  (cd /tmp/old && LORA_SWEEP_GIT_COMMIT=$old python3 bench/seed_vs_ours.py --sizes 1b --workdir $W --budget-s 200 --only "$MB32" --out "$out/svo-1b-mb32-old.json" 2>&1 | grep -E "^1b  " | tail -n 3)
fi
if [[ " $steps " == *" hf "* ]]; then
  step "HF Trainer tuned, mb 32x1"
  OUT=$out timeout 200 python3 .whl/hf_trainer_tuned.py "1b-lora:bs=32,ga=1,gc=0,attn=sdpa,optim=adamw_torch_fused,emb=0,liger=1,abf16=1,steps=10" 2>&1 | grep RESULT
fi
hf_liger() {  # HF Trainer tuned at 8 sequences a step, at micro-batches "$@", liger on and off
  for bs in "$@"; do for liger in 1 0; do
    step "HF Trainer tuned, mb ${bs}x$((8 / bs)), liger $liger"
    mkdir -p $out/hf-mb$bs-liger$liger; OUT=$out/hf-mb$bs-liger$liger timeout 240 python3 .whl/hf_trainer_tuned.py "1b-lora:bs=$bs,ga=$((8 / bs)),gc=0,attn=sdpa,optim=adamw_torch_fused,emb=0,liger=$liger,abf16=1,steps=10" 2>&1 | grep RESULT
  done; done
}
if [[ $steps == *hfsmall* ]]; then
  hf_liger 1 2  # HF Trainer's best switch at micro-batches 1-2 (the sweep's 1x8 and 2x4 trials)
fi
if [[ " $steps " == *" hfmid "* ]]; then
  hf_liger 4 8  # the same at 4x2 and 8x1: where liger starts to win for HF Trainer (sweepfair uses it)
fi
if [[ " $steps " == *" hfcompile "* ]]; then
  # issue 30 item 2: HF Trainer tuned with torch_compile=True, beside the same without, at mb 32 and 8
  for bs in 32 8; do for c in 1 0; do
    step "HF Trainer tuned, mb ${bs}x$((32 / bs)), liger, torch_compile $c"
    mkdir -p $out/hf-mb$bs-compile$c; OUT=$out/hf-mb$bs-compile$c timeout 300 python3 .whl/hf_trainer_tuned.py "1b-lora:bs=$bs,ga=$((32 / bs)),gc=0,attn=sdpa,optim=adamw_torch_fused,emb=0,liger=1,abf16=1,compile=$c,steps=10" 2>&1 | grep -E "RESULT|Error" | tail -n 2
  done; done
fi
if [[ " $steps " == *" sweepfair "* ]]; then
  # the 8-trial sweep against HF Trainer one at a time at its best liger switch per micro-batch: the
  # smallest of 1, 2, 4, 8 from which liger was faster in this run's hfsmall/hfmid figures, else
  # bench/hf_serial.py's LIGER_FROM (measured: 8). Ray must be carried (.whl, not .whlq).
  if ! python3 -c "import ray" 2>/dev/null; then
    echo "sweepfair: skipped: ray is not importable (carry .whl, the staged wheels with ray, not .whlq)"
  else
    from=$(python3 - "$out" <<'PY'
import json, sys
def tps(mb, liger):
    try:
        return json.load(open(f"{sys.argv[1]}/hf-mb{mb}-liger{liger}/baseline.json"))[-1]["tokens_per_s"]
    except (OSError, ValueError, IndexError, KeyError):
        return None
measured = [mb for mb in (1, 2, 4, 8) if tps(mb, 1) and tps(mb, 0)]
wins = [mb for mb in measured if tps(mb, 1) >= tps(mb, 0)]
print(min(wins) if wins else (16 if measured else ""))
PY
)
    step "8 trials x ${SWEEP_STEPS:-60} steps: default sweep, HF Trainer tuned one at a time with liger from micro-batch ${from:-LIGER_FROM}"
    LORA_SWEEP_GIT_COMMIT=$commit python3 bench/packing.py --size 1b --trials 8 --steps "${SWEEP_STEPS:-60}" --modes default,hf ${from:+--hf-liger-from "$from"} --budget 1000 --workdir $W --out "$out/pack-1b-fair.json" 2>&1 | quiet 30
  fi
fi
if [[ $steps == *sweep* && " $steps " != *" sweepfair "* ]]; then
  step "8 trials x 60 steps: default sweep, HF Trainer tuned one at a time, our engine one at a time"
  LORA_SWEEP_GIT_COMMIT=$commit python3 bench/packing.py --size 1b --trials 8 --steps 60 --modes default,hf,serial --budget 1100 --workdir $W --out "$out/pack-1b.json" 2>&1 | quiet 30
fi
if [[ $steps == *12b* ]]; then
  wait_import bitsandbytes 60
  step "12B QLoRA cohort of 4"
  LORA_SWEEP_GIT_COMMIT=$commit python3 bench/cohort.py --sizes 12b --rows 4:0.05:auto --members packing --no-serial --compile --profile --budget 420 --workdir $W --out "$out/cohort-12b-k4.json" 2>&1 | quiet 8
fi
if [[ " $steps " == *" bigpass "* ]]; then
  step "cohort of 8, $commit, passes <= 32,768 tokens (two a micro-step instead of three)"
  LORA_SWEEP_GIT_COMMIT=$commit python3 bench/cohort.py ${K8/--pass-tokens 24576/--pass-tokens 32768} --out "$out/cohort-1b-k8-pass32k.json" 2>&1 | quiet 4
fi
if [[ " $steps " == *" qlorapass "* ]]; then
  for pass in 4096 8192; do
    step "12B QLoRA cohort of 4 without checkpointing, passes <= $pass tokens"
    LORA_SWEEP_GIT_COMMIT=$commit python3 bench/cohort.py --sizes 12b --rows 4:0.05:off --pass-tokens $pass --members packing --no-serial --compile --profile --budget 300 --workdir $W --out "$out/cohort-12b-k4-pass$pass.json" 2>&1 | quiet 8
  done
fi
if [[ " $steps " == *" compilepay "* ]]; then
  # core.rules.COMPILE_PAYS_AFTER_S from counted figures: the 8-member cohort eager, then compiled,
  # the same passes; the compile's cost is the compiled warm-up's seconds over the eager one's (net of
  # what the warm-up's compiled steps already gained), paid back by the gain of every step after it
  step "cohort of 8, eager, passes <= 24,576 tokens, 6 warm-up micro-steps timed"
  LORA_SWEEP_GIT_COMMIT=$commit python3 bench/cohort.py ${K8/--compile /} --out "$out/cohort-1b-k8-eager.json" 2>&1 | quiet 4
  step "cohort of 8, compiled, the same"
  LORA_SWEEP_GIT_COMMIT=$commit python3 bench/cohort.py $K8 --out "$out/cohort-1b-k8-compiled.json" 2>&1 | quiet 4
  python3 - "$out" <<'PY'
import json, sys
rows = {c: json.load(open(f"{sys.argv[1]}/cohort-1b-k8-{c}.json"))["results"][0] for c in ("eager", "compiled")}
e, c = rows["eager"], rows["compiled"]
extra = sum(c["warmup_seconds_all"]) - sum(e["warmup_seconds_all"])
gain = 1 - c["micro_step_seconds"] / e["micro_step_seconds"]
pays = f"pays after {extra / gain:.0f} s of eager training" if gain > 0 else "never pays"
print(f"compile: +{extra:.1f} s of warm-up; micro-step {e['micro_step_seconds']:.3f} s eager, {c['micro_step_seconds']:.3f} s compiled ({gain:+.1%}); {pays}")
PY
fi
if [[ " $steps " == *" qlorafold "* ]]; then
  # a member's micro-batches folded into forwards of at most 4,096 tokens, so that passes of 4,096
  # tokens fit an 80 GB card without checkpointing (8,192 did not: out of memory, thirteenth session)
  # bitsandbytes may come with a later call (the 64 MiB carry holds ray or it, not both): wait for it
  wait_import bitsandbytes 60
  step "12B QLoRA cohort of 4 without checkpointing, forwards and passes <= 4096 tokens"
  LORA_SWEEP_GIT_COMMIT=$commit python3 bench/cohort.py --sizes 12b --rows 4:0.05:off --fold-tokens 4096 --pass-tokens 4096 --members packing --no-serial --compile --profile --budget 360 --workdir $W --out "$out/cohort-12b-k4-fold4096.json" 2>&1 | quiet 8
fi
if [[ " $steps " == *" swcompile "* ]]; then
  # core.rules.COMPILE_PAYS_AFTER_S in a real sweep: the 8 trials' default sweep (eager: each worker
  # trains ~66 s at EAGER_TRAIN_FLOPS, under 300 s) beside the same with train.compile: true (what
  # compilepay's static-cohort threshold would pick for it), same call.
  wait_import ray 90
  for c in eager compiled; do
    step "8 trials x ${SWEEP_STEPS:-60} steps: our default sweep, $c layers"
    LORA_SWEEP_GIT_COMMIT=$commit python3 bench/packing.py --size 1b --trials 8 --steps "${SWEEP_STEPS:-60}" --modes default $([[ $c == compiled ]] && echo --compile) --budget 600 --workdir $W --out "$out/pack-1b-$c.json" 2>&1 | quiet 12
  done
fi
step "done"
