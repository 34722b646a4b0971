"""The `auto` decisions, made the same way by the estimator (in the driver, before a trial is
launched) and by the trainable (on the worker), because both ask here.

The defaults follow the Gemma 3 fine-tuning recipe this project started from: LoRA on the seven
projections, paged 8-bit AdamW under QLoRA.
"""

from __future__ import annotations

TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}  # the recipe's seven projections = all-linear
TARGET_PRESETS = tuple(TARGET_MODULES)
CHECKPOINTING_SHARE = 0.25  # auto checkpointing: activations above this share of the device
# In a cohort, a member's micro-batches go through one forward together, up to this many tokens
# (see cohort_fold): forwards of a few rows each left the cohort step launch-bound (bench/BENCH.md,
# "Cohort sweeps vs packed vs one at a time, and two GPUs with cohorts (issues 15, 17)").
COHORT_FOLD_TOKENS = 16384
# The smallest forward pass worth splitting a cohort's micro-step into (core.estimate.CohortBudget.
# step_plan): below it a pass is launch-bound, and one checkpointed pass of every member is faster.
COHORT_PASS_MIN_TOKENS = 8192
# Tokens per chunk of liger-kernel's fused lm_head + cross-entropy (train.loss: liger; trainable/fast.py
# sizes liger's chunks to at most this many, core.estimate counts one chunk of bf16 logits). liger's
# own sizing makes ~230 chunks per call at Gemma 3's vocabulary, each reading the whole lm_head twice.
LIGER_CHUNK_TOKENS = 2048


def target_names(target_modules: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A preset (attention, mlp, all-linear) -> its module names; an explicit list as a tuple."""
    return TARGET_MODULES[target_modules] if isinstance(target_modules, str) else tuple(target_modules)


def optimizer(requested: str, method: str) -> str:
    """auto: paged 8-bit AdamW for QLoRA (the recipe's choice: small optimizer state), plain
    AdamW for LoRA."""
    if requested != "auto":
        return requested
    return "paged_adamw_8bit" if method == "qlora" else "adamw"


def gradient_checkpointing(requested: bool | str, activation_bytes: float, device_bytes: float | None) -> bool:
    """on / off as configured; auto: on when the decoder's saved activations (`activation_bytes`,
    see core.estimate.layer_activation_bytes) would take more than a quarter of the device. Never
    without a device size (a CPU, where memory is not the constraint)."""
    if requested != "auto":
        return bool(requested)
    return device_bytes is not None and activation_bytes > CHECKPOINTING_SHARE * device_bytes


def cohort_fold(micro_batch: int, grad_accum: int, seq_len: int, max_tokens: int = COHORT_FOLD_TOKENS) -> int:
    """How many of a cohort member's micro-batches one cohort forward takes together: the largest
    divisor f of grad_accum with micro_batch * f * seq_len <= max_tokens (at least 1).

    It changes no result: a member's loss is normalised over the reply tokens of its whole
    optimizer step, so its gradient is the same sum whether its rows go through in `grad_accum`
    forwards or fewer; it still steps when its accumulation completes. It changes the number of
    forwards: a member with micro-batch 1 x accumulation 8 took 8 cohort forwards per step, and
    the cohort as many steps as its slowest member, most forwards carrying a few rows (bench/BENCH.md,
    "Cohort sweeps vs packed vs one at a time, and two GPUs with cohorts (issues 15, 17)", item 1).
    It depends on the member alone, so its dropout masks (one seed per forward) do not depend on
    who else is in the cohort."""
    best = 1
    for f in range(1, max(1, grad_accum) + 1):
        if grad_accum % f == 0 and micro_batch * f * seq_len <= max_tokens:
            best = f
    return best


def cohort_passes(tokens: list[int], cap: int | None) -> list[list[int]]:
    """The forward passes of one cohort micro-step: indices into `tokens` (each member's tokens in
    the micro-step), in order, grouped so that no pass holds more than `cap` tokens (a member above
    it goes alone); None: one pass of everyone.

    It changes no result: members share no parameter and each member's loss has its own
    normaliser, so a member's gradient is the same whether the others run in its pass or in
    another. It changes memory: a pass's activations are freed by its backward before the next
    pass, so members that do not fit one forward without gradient checkpointing can still train
    without it: one checkpointed pass of every member recomputes its forward and was slower than a
    lone trial without checkpointing (bench/BENCH.md, "Cohorts with folding, two GPUs, grouped
    LoRA, the fast step's missing rows (issues 15, 16, 17)", item 1)."""
    if cap is None or not tokens:
        return [list(range(len(tokens)))] if tokens else []
    passes: list[list[int]] = []
    held = 0
    for i, n in enumerate(tokens):
        if passes and held + n <= cap:
            passes[-1].append(i)
            held += n
        else:
            passes.append([i])
            held = n
    return passes


def search_algorithm(requested: str, objectives: int, grid_size: int | None, num_trials: int | None, startup: str = "sobol",
                     n_startup_trials: int | None = None) -> tuple[str, str]:  # fmt: skip
    """(the sampler to use, why, in one short line) for search.algorithm. `auto` follows the search
    suite (bench/search_suite.py, 3 discrete tasks and a continuous one, real training): at 20% of an
    exhaustive grid's training steps, TPE with ASHA came within 2% of the grid's best on more seeds
    than GP, QMC (Sobol) alone, CMA-ES and random search, best with its start-up trials drawn as
    scrambled Sobol points (search.startup: sobol, sweep.engine.study.sobol_points) and repeated
    proposals skipped with their result told again (sweep.engine.study.close_duplicate). The
    figures: bench/BENCH.md, "Search suite: which sampler and pruner win on small budgets (issue
    18)", "Sobol start-up trials for TPE: the sweep's new default (issue 18)" and "Search suite:
    repeated proposals skipped, their results told again". `grid_size`: the number of
    configurations when every dimension is discrete, else None. `startup`: search.startup;
    `n_startup_trials`: search.n_startup_trials (None: the default, tpe_startup_trials); the reason
    says how many start-up trials this sweep runs."""
    if requested != "auto":
        return requested, "as configured"
    if grid_size is not None and num_trials is None:
        return "grid", f"auto: no search.num_trials and a discrete space: each of its {grid_size} configurations once (grid)"
    covered = f"; num_trials covers all {grid_size} configurations: algorithm: grid tries each once" if grid_size and num_trials and num_trials >= grid_size else ""
    count = tpe_startup_trials(n_startup_trials, num_trials or grid_size or 0)
    first = f"{count} {'Sobol' if startup == 'sobol' else 'random'} start-up trial{'s' if count != 1 else ''}"
    source = "search.n_startup_trials" if n_startup_trials else "half the trials, at most 10"
    if objectives > 1:
        return "tpe", f"auto: several objectives: TPE (multi-objective) after {first} ({source})" + covered
    return "tpe", f"auto: TPE after {first} ({source}), the search suite's best (bench/BENCH.md)" + covered


def tpe_startup_trials(requested: int | None, num_trials: int) -> int:
    """Random trials before TPE models the space: as configured, else half the trials, at most 10
    (the search suite's best count at ~20 trials: bench/BENCH.md, "Search suite: which sampler and
    pruner win on small budgets (issue 18)")."""
    return requested or max(1, min(10, num_trials // 2))


# ----------------------------------------------------------------------------------------------
# the fast step's `auto` settings (train.loss, train.lora_dtype, train.compile)

# train.compile: auto. Compiling a worker's decoder layers costs a fixed time once and makes every
# later cohort step faster: it repays itself once a worker trains for about COMPILE_PAYS_AFTER_S
# seconds (the compile's cost over the step's gain), as EAGER_TRAIN_FLOPS estimates the training.
# Set from counted figures in a real sweep, where the compile cost more than in a static cohort
# (not profiled; a sweep's evals run other shapes through the compiled layers): bench/BENCH.md,
# "The 8-trial sweep against HF Trainer at its best switches, what the compile costs in a sweep,
# ...", "What a compile costs".
# A static cohort's cost alone (bench/gpu_chain_30.sh's `compilepay`) would set it lower and
# compile sweeps that lose by it (measured there).
COMPILE_PAYS_AFTER_S = 300.0
# the rate a worker's eager step is taken to reach, to estimate how long it trains: a quarter of
# the dense bf16 peak of an H100 / H200. The eager cohort steps measured so far reached less
# (bench/BENCH.md, "Cohort passes and grouped LoRA in a sweep, the 12B memory row, ..."), so the
# estimate errs towards short trials: towards not compiling.
EAGER_TRAIN_FLOPS = 2.5e14


def loss(requested: str, cuda: bool, liger_installed: bool) -> tuple[str, str]:
    """(loss implementation, why). auto: liger-kernel's fused linear + cross-entropy where it runs
    (CUDA, and the package installed: `pip install lora-sweep[gpu]`), the fastest correct loss
    measured (bench/BENCH.md); else the chunked loss, which needs neither."""
    if requested != "auto":
        return requested, "as configured"
    if cuda and liger_installed:
        return "liger", "auto: CUDA and liger-kernel: its fused linear + cross-entropy"
    missing = "no CUDA" if not cuda else "liger-kernel is not installed (pip install 'lora-sweep[gpu]')"
    return "chunked", f"auto: {missing}: the chunked loss"


def lora_dtype(requested: str, compute_dtype: str) -> tuple[str, str]:
    """(float32 | bfloat16, why). auto: LoRA in bf16 (fp32 masters in the optimizer) where the base
    computes in bf16, so the adapters meet bf16 activations without casts; fp32 elsewhere."""
    if requested != "auto":
        return requested, "as configured"
    if compute_dtype == "bfloat16":
        return "bfloat16", "auto: the base computes in bf16"
    return "float32", f"auto: the base computes in {compute_dtype}"


def compile_layers(requested: bool | str, cuda: bool, train_flops: float) -> tuple[bool, str]:
    """(compile the decoder layers, why). auto: on a GPU, when a worker's share of the sweep's
    training (`train_flops`: 6 x parameters x tokens, over the workers) would take longer in eager
    mode than COMPILE_PAYS_AFTER_S at EAGER_TRAIN_FLOPS; short trials (and CPUs) skip the compile."""
    if requested != "auto":
        return bool(requested), "as configured"
    if not cuda:
        return False, "auto: no GPU"
    seconds = train_flops / EAGER_TRAIN_FLOPS
    if seconds >= COMPILE_PAYS_AFTER_S:
        return True, f"auto: each worker trains for about {seconds / 60:.0f} min, long enough to repay compiling its decoder layers"
    return False, f"auto: each worker trains for about {seconds:.0f} s, too short to repay compiling its decoder layers"
