#!/bin/bash
# The next GPU session's runs for issue 16, one after another on ONE GPU (the single-H200 kind),
# each with its own log, exit code and JSON under /tmp/runs (packing's sweeps under /tmp/runs/pack,
# so that `.whl/on-gpu wait` sees only these steps' logs: it waits on every /tmp/runs/*.log that
# has no .rc, and packing writes its driver logs beside its JSON).
#   call 1: bash .whl/on-gpu setup && bash .whl/on-gpu start 0 chain bash bench/gpu_chain.sh && bash .whl/on-gpu wait 540 /tmp/copy
#   call 2 (at once, the host goes back ~30 s after a call): bash .whl/on-gpu wait 540 /tmp/copy
#   each call ends with: cd /tmp/runs && tar czf $OUT/runs.tgz --exclude='shim*' *
# About 1,300 s of GPU work (the 1B checkpoint ~5 s, the 12B ~90 s; one workdir, so they are built once).
cd "$(dirname "$0")/.."
mkdir -p /tmp/runs/pack
step() {
  local name=$1; shift
  echo "== $name $(date +%T)"
  ("$@") > "/tmp/runs/$name.log" 2>&1
  echo $? > "/tmp/runs/$name.rc"
  echo "== $name rc $(cat "/tmp/runs/$name.rc") $(date +%T)"
}
# 12B configurations of the 2026-11-30 compiled cohort, the lr 9.08e-4 one (3.85% apart with dropout) first
C4='[{"lora_r": 64, "lora_alpha_ratio": 2, "target_modules": "all-linear", "learning_rate": 0.000908, "batch": [2, 4]},
     {"lora_r": 64, "lora_alpha_ratio": 2, "target_modules": "attention", "learning_rate": 0.000109, "batch": [4, 2]},
     {"lora_r": 16, "lora_alpha_ratio": 2, "target_modules": "all-linear", "learning_rate": 0.000668, "batch": [2, 4]},
     {"lora_r": 16, "lora_alpha_ratio": 1, "target_modules": "all-linear", "learning_rate": 7.6e-05, "batch": [1, 8]}]'
# 1B rows never measured beside HF best in one run: mb 16 (the 2.29x row), mb 32 (new), compiled fp32, flex_attention;
# CUDA graphs at mb 8 again (now with dynamo's counters) and at mb 1 (skipped on 2026-12-01)
step svo-1b-rest python3 bench/seed_vs_ours.py --sizes 1b --workdir /tmp/w \
  --only "HF best: mb|mb 16x2|mb 32x1|flex_attention|LoRA fp32, chunked loss, compiled|CUDA graphs" --budget-s 540 --out /tmp/runs/svo-1b-rest.json
# where the fastest rows' GPU time goes (torch.profiler over the timed steps; its overhead lowers their tok/s)
step profile-1b python3 bench/seed_vs_ours.py --sizes 1b --workdir /tmp/w --only "ours: mb 16x2" --profile --budget-s 150 --out /tmp/runs/profile-1b.json
step profile-12b python3 bench/seed_vs_ours.py --sizes 12b --workdir /tmp/w --only "ours: mb 8x4" --profile --budget-s 240 --out /tmp/runs/profile-12b.json
# compiled vs eager 12B cohorts without dropout: step for step the same computation, so only numerics differ
step cohort-12b-eager-nodrop python3 bench/packing.py --size 12b --modes cohort --configs "$C4" --dropout 0 --budget 230 \
  --workdir /tmp/w --out /tmp/runs/pack/cohort-12b-eager-nodrop.json
step cohort-12b-compiled-nodrop python3 bench/packing.py --size 12b --modes cohort --compile --configs "$C4" --dropout 0 --budget 260 \
  --workdir /tmp/w --out /tmp/runs/pack/cohort-12b-compiled-nodrop.json
echo "== chain done $(date +%T)"
