"""One trial, top to bottom: load -> (resume) -> train with periodic eval + checkpoint -> final report.

The loop reports to a `Reporter` (Ray Tune in a sweep; a list in tests) at every eval: the metrics
ASHA and Optuna act on, the train-loss history since the last report, and a checkpoint of the
adapter + optimizer so the trial can resume. OOM and a non-finite loss end the trial with a final
report whose `trial_status` says so; other exceptions propagate (the sweep records them as failed).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

from core.contract import ERROR, LEARNING_RATE, STATUS, STEP, TrialStatus
from core.estimate import CONTEXT_BYTES
from core.request import TrialRequest
from core.schema import TrainSection

CHECKPOINT_STATE = "trainer_state.json"
FAULTS_ENV = "LORA_SWEEP_FAULTS"


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs: the fixed settings plus this trial's sampled hyperparameters."""

    model_id: str
    revision: str | None
    data_dir: str
    train: TrainSection
    sampled: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    embeddings: str = "frozen"  # model.embeddings: auto | full | new_tokens | frozen
    template_ids: tuple[int, ...] = ()  # special tokens the data uses (rows new_tokens trains)
    max_seq_len: int = 1024
    gpu_share: float | None = None  # auto placement: the fraction of the GPU this trial was given
    gpu_bytes: int | None = None  # the GPU size that share is of (resources.gpu_memory_gb); None: the device's
    stop_file: str | None = None  # `python -m sweep stop` writes it: checkpoint and stop
    resume_checkpoint: str | None = None  # resumed / retried trial: continue from this checkpoint

    def with_sampled(self, sampled: dict[str, Any]) -> "TrialSpec":
        """This spec for one trial, from Tune's config (hyperparameters, placement and resume data)."""
        request = TrialRequest.from_config(sampled)
        known = {k: v for k, v in request.hyper.items() if k in TrainSection.model_fields}
        share = self.gpu_share if request.allocation.gpu_share is None else request.allocation.gpu_share
        resume = self.resume_checkpoint if request.resume_checkpoint is None else request.resume_checkpoint
        return replace(self, train=self.train.model_copy(update=known), sampled=dict(request.hyper), gpu_share=share, resume_checkpoint=resume)


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...

    def restore(self) -> Any:  # a context manager yielding a checkpoint folder or None
        ...


class MemoryReporter:
    """A Reporter that keeps every report in a list and has no checkpoint to restore: for running
    a trial in this process (tests, benchmarks)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)

    @contextmanager
    def restore(self) -> Iterator[None]:
        yield None


# ----------------------------------------------------------------------------------------------
# memory


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak is this trial's, not the worker's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: Any) -> dict[str, float]:
    import torch

    if device.type == "cuda":
        return {
            "peak_vram_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_vram_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return {"peak_rss_gb": int(line.split()[1]) / 2**20}
    except OSError:
        pass
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def cap_memory(share: float | None, gpu_bytes: int | None = None) -> float | None:
    """On a shared GPU, keep this process inside the share Ray gave it: past that, PyTorch raises
    OOM in this trial instead of taking memory from the trials beside it. The share is of
    `gpu_bytes` (the GPU size placement planned with: resources.gpu_memory_gb, which may be set
    below the device's memory), else of the whole device. Returns the fraction of the device used."""
    import torch

    if not share or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    allowed = share * min(gpu_bytes or total, total)
    if allowed >= total:
        return None
    fraction = max(0.01, (allowed - CONTEXT_BYTES) / total)  # the share also covers the CUDA context
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


def _ray_node() -> str:
    """The Ray node this trial runs on (a cluster sweep spreads trials over nodes), or 'local'."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # no Ray here (tests, benchmarks)
        return "local"


def _gpu_ids() -> str:
    """The GPU(s) Ray gave this trial (a fractional share names the GPU it shares), or 'none'."""
    try:
        import ray

        ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # no Ray here (tests, benchmarks)
        ids = []
    return ",".join(str(i) for i in ids) or "none"


def injected_fault(sampled: dict[str, Any], kinds: tuple[str, ...] = ("oom", "nan")) -> tuple[str, int] | None:
    """Fault injection, for testing how a sweep survives failing trials; unset in normal use.

    LORA_SWEEP_FAULTS="oom@3:lora_r=8;nan@2:lora_r=16" makes trials whose sampled lora_r is 8 run
    out of memory in step 3, and those with lora_r 16 produce a NaN loss from step 2 on. Ray
    workers inherit the variable from the process that starts Ray. A cohort worker also knows
    `oom_cohort@N`: out of memory from step N while other members train beside it (it fits alone).
    """
    for entry in filter(None, os.environ.get(FAULTS_ENV, "").split(";")):
        head, _, condition = entry.partition(":")
        kind, _, step = head.partition("@")
        wanted = dict(item.split("=", 1) for item in condition.split(",") if "=" in item)
        if kind in kinds and step.isdigit() and all(str(sampled.get(k)) == v for k, v in wanted.items()):
            return kind, int(step)
    return None


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


# ----------------------------------------------------------------------------------------------
# pieces of the loop


def build_optimizer(params: list, train: TrainSection, device: Any) -> Any:
    import torch

    from trainable.model import resolve_optimizer

    name = resolve_optimizer(train)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay, fused=device.type == "cuda")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def build_schedule(optimizer: Any, train: TrainSection) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler
    warmup = int(round(train.warmup_ratio * train.max_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=train.max_steps)


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """Tensors to the device without blocking the host (pinned first on CUDA)."""
    import torch

    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if device.type == "cuda":
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
        out[key] = value
    return out


def summed_batch_loss(model: Any, batch: dict[str, Any], impl: str) -> Any:
    """Sum of the cross-entropy over the batch's reply tokens (`batch` already on the device)."""
    if impl == "chunked":
        from trainable.loss import summed_loss

        return summed_loss(model, batch["input_ids"], batch["position_ids"], batch["loss_index"], batch["targets"])
    if impl == "liger":
        from trainable.fast import liger_summed_loss

        return liger_summed_loss(model, batch["input_ids"], batch["position_ids"], batch["loss_index"], batch["targets"])
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
        num_items_in_batch=1,  # the model's loss comes back as a sum over tokens
        use_cache=False,
    )
    return out.loss


def evaluate(model: Any, ds: Any, batch_size: int, pad_id: int, device: Any, impl: str = "chunked", fast: Any = None) -> float:
    """Token-weighted mean loss over every reply token of the eval set."""
    import torch

    from trainable.data import eval_batches

    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for batch in eval_batches(ds, batch_size, pad_id):
            if batch["loss_tokens"] == 0:
                continue
            if fast is not None:
                fast.begin_forward()
            total += summed_batch_loss(model, to_device(batch, device), impl).double()
            count += batch["loss_tokens"]
    model.train()
    return float(total) / max(count, 1)


def save_checkpoint(folder: Path, model: Any, optimizer: Any, schedule: Any, state: dict[str, Any], fast: Any = None) -> None:
    import torch

    from trainable.model import adapter_state

    folder.mkdir(parents=True, exist_ok=True)
    # torch.save, not safetensors: with `embeddings: full` the trainable embed_tokens and lm_head
    # are one tied tensor, which safetensors refuses and torch.save stores once. PEFT loads
    # adapter_model.bin as readily as adapter_model.safetensors.
    torch.save({k: v.detach().cpu() for k, v in adapter_state(model).items()}, folder / "adapter_model.bin")
    model.peft_config["default"].save_pretrained(str(folder))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    # lora_dtype bfloat16: the adapter file holds the bf16 weights, the fp32 masters go with the optimizer.
    masters = fast.state_dict() if fast is not None else None
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": rng, "masters": masters}, folder / "optimizer.pt")
    (folder / CHECKPOINT_STATE).write_text(json.dumps(state))


def load_checkpoint(folder: Path, model: Any, optimizer: Any, schedule: Any, fast: Any = None) -> dict[str, Any]:
    import torch

    from trainable.model import load_adapter_state

    load_adapter_state(model, torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True))
    opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    if fast is not None:
        fast.load_state_dict(opt.get("masters"))
    optimizer.load_state_dict(opt["optimizer"])
    schedule.load_state_dict(opt["schedule"])
    # Dropout draws from these: restoring them makes a resumed trial continue exactly.
    torch.set_rng_state(opt["rng"]["cpu"])
    if opt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(opt["rng"]["cuda"])
    return json.loads((folder / CHECKPOINT_STATE).read_text())


# ----------------------------------------------------------------------------------------------
# the trial


def run(spec: TrialSpec, reporter: Reporter) -> dict[str, Any]:
    """Train one trial; returns the last metrics reported.

    OOM and a non-finite loss are results (a final report says so); any other exception propagates.
    A base model kept for reuse is handed back clean on the way out, or dropped after an error.
    """
    import torch

    from trainable.fast import forget_cuda_graphs

    holder: dict[str, Any] = {}
    try:
        metrics = _train(spec, reporter, holder)
    except Exception as exc:
        if not is_oom(exc):
            from trainable.model import release

            release(holder.get("loaded"), keep_base=False)
            raise
        message = str(exc).splitlines()[0][:500]
    else:
        from trainable.model import release

        release(holder.get("loaded"), keep_base=True)
        return metrics
    finally:
        forget_cuda_graphs()  # however the trial ended
    # OOM is a result, not a crash. Out here the exception and its traceback (which pin the model,
    # optimizer and activations) are gone, so the memory can really be given back.
    from trainable.model import clear_base_cache

    step = holder.get("state", {}).get("step", 0)
    holder.clear()
    clear_base_cache()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    metrics = {STEP: step, STATUS: TrialStatus.OOM, ERROR: message}
    reporter.report(metrics, None)
    return metrics


def _train(spec: TrialSpec, reporter: Reporter, holder: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainable.data import load_split, train_batches
    from trainable.model import load_model

    train = spec.train
    torch.set_num_threads(max(1, spec.threads))
    memory_cap = cap_memory(spec.gpu_share, spec.gpu_bytes)
    _reset_peak_rss()
    started = time.perf_counter()
    state: dict[str, Any] = {"step": 0, "tokens": 0, "loss_tokens": 0, "train_seconds": 0.0, "warm": None}
    holder["state"] = state
    loaded = holder["loaded"] = load_model(
        spec.model_id,
        train,
        spec.revision,
        embeddings=spec.embeddings,
        template_ids=list(spec.template_ids),
        tokens_per_micro_batch=train.batch[0] * spec.max_seq_len,
        reuse_base=train.reuse_base_model,
    )
    model, device = loaded.model, loaded.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_ds, eval_ds = load_split(spec.data_dir, "train"), load_split(spec.data_dir, "eval")
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    from trainable import fast as fast_step

    fast = fast_step.prepare(model, train, loaded.dtype)  # lora_dtype, loss: liger, compile
    params = fast.optimizer_params([p for p in model.parameters() if p.requires_grad])
    optimizer = build_optimizer(params, train, device)
    schedule = build_schedule(optimizer, train)
    with reporter.restore() as folder:
        if folder is not None:
            state.update(load_checkpoint(Path(folder), model, optimizer, schedule, fast))
    load_seconds = time.perf_counter() - started
    micro, accum = train.batch
    derived = {
        **loaded.info,
        **fast.info,
        "micro_batch": micro,
        "grad_accum": accum,
        "effective_batch": micro * accum,
        "tokens_per_sec_counts": "all non-padding input tokens, after the first logging window (loss_tokens_per_sec: reply tokens only)",
        "memory_cap_fraction": memory_cap if memory_cap is not None else "none",
        "ray_node": _ray_node(),
        "gpu_ids": _gpu_ids(),
    }
    return _loop(spec, reporter, model, device, optimizer, schedule, train_ds, eval_ds, pad_id, state, load_seconds, derived, train_batches, fast)


def optimizer_step(model: Any, batch_list: list[dict[str, Any]], device: Any, train: TrainSection, optimizer: Any, schedule: Any,
                   fast: Any = None, fault: str | None = None) -> Any:
    """One optimizer step over the accumulation's micro-batches; returns its loss as a device tensor.

    No host syncs in here (no .item(), float() or bool() of a device tensor): the host queues the
    whole step and the caller reads the loss once per logging window. Which positions carry loss
    is computed by the collator on the CPU, so no step needs to ask the device.
    """
    import torch

    n_loss = sum(b["loss_tokens"] for b in batch_list)
    total = torch.zeros((), device=device)
    for b in batch_list:
        # token-weighted mean over the whole optimizer step, whatever the micro-batch split
        if fast is not None:
            fast.begin_forward()
        loss = summed_batch_loss(model, to_device(b, device), train.loss) / max(n_loss, 1)
        if fault == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULTS_ENV})")
        if fault == "nan":
            loss = loss * float("nan")
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], train.max_grad_norm)
    optimizer.step()
    if fast is not None:
        fast.after_optimizer_step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _loop(spec, reporter, model, device, optimizer, schedule, train_ds, eval_ds, pad_id, state, load_seconds, derived, train_batches, fast=None) -> dict[str, Any]:
    import torch

    train = spec.train
    micro, accum = train.batch
    eval_batch = train.eval_batch_size or micro
    batches = train_batches(train_ds, micro, train.seed, state["step"] * accum, pad_id)
    history: list[list[float]] = []  # [step, train_loss, lr] since the last report
    window_loss = torch.zeros((), device=device)
    window_steps = 0
    report_losses: list[float] = []
    # The checkpoint carries everything this trial logged. A restored trial re-sends it once, with
    # its first report: what the driver logged before a crash is skipped there, what it never saw
    # (a checkpoint persisted just before the driver died) is logged now.
    state.setdefault("log", [])
    state.setdefault("evals", [])
    replay = {"history": list(state["log"]), "evals": list(state["evals"])} if state["step"] > 0 else None
    first_report = True
    model.train()
    metrics: dict[str, Any] = {}
    fault = injected_fault(spec.sampled)
    if replay and state["step"] >= train.max_steps and state["evals"]:
        # Restored from the final checkpoint: the trial finished, but its driver died before it
        # recorded that. Report the final evaluation again rather than end without a result
        # (which would read as a trial stopped early).
        step, loss, lr = state["log"][-1] if state["log"] else (state["step"], float("nan"), float("nan"))
        metrics = {
            **state["evals"][-1], **peak_memory(device), "train_loss": loss, LEARNING_RATE: lr, STATUS: TrialStatus.COMPLETED,
            "derived": derived, "history": replay["history"], "evals_replay": replay["evals"],
            "train_seconds": state["train_seconds"], "load_seconds": load_seconds,
        }  # fmt: skip
        reporter.report(metrics, None)
        return metrics
    while state["step"] < train.max_steps:
        tick = time.perf_counter()
        batch_list = [next(batches) for _ in range(accum)]
        lr = schedule.get_last_lr()[0]
        due = fault[0] if fault and state["step"] + 1 >= fault[1] else None
        window_loss += optimizer_step(model, batch_list, device, train, optimizer, schedule, fast, due)
        state["tokens"] += sum(b["tokens"] for b in batch_list)
        state["loss_tokens"] += sum(b["loss_tokens"] for b in batch_list)
        state["step"] += 1
        window_steps += 1
        step = state["step"]
        is_eval = step % train.eval_every == 0 or step == train.max_steps
        if step % train.log_every == 0 or is_eval:
            loss = float(window_loss) / window_steps  # one host sync per logging window
            window_loss.zero_()
            window_steps = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            state["train_seconds"] += time.perf_counter() - tick
            if not math.isfinite(loss):
                metrics = {STEP: step, STATUS: TrialStatus.NAN, ERROR: f"train loss is {loss} at step {step}"}
                reporter.report(metrics, None)
                return metrics
            history.append([step, loss, lr])
            state["log"].append([step, loss, lr])
            report_losses.append(loss)
            if state["warm"] is None:
                # Throughput is counted from here on: the first window pays for lazy init and
                # allocator warm-up, which a long trial does not see again.
                state["warm"] = [state["tokens"], state["loss_tokens"], state["train_seconds"]]
        else:
            state["train_seconds"] += time.perf_counter() - tick
        if spec.stop_file and os.path.exists(spec.stop_file) and not is_eval:
            # `python -m sweep stop`: keep this step's work; `resume` continues from here.
            metrics = {STEP: step, STATUS: TrialStatus.STOPPED, "history": history}
            if replay:
                metrics.update(history=replay["history"] + history, evals_replay=replay["evals"])
            with _scratch() as folder:
                save_checkpoint(folder, model, optimizer, schedule, state, fast)
                reporter.report(metrics, str(folder))
            return metrics
        if not is_eval:
            continue
        eval_loss = evaluate(model, eval_ds, eval_batch, pad_id, device, train.loss, fast)
        done = step == train.max_steps
        tokens, loss_tokens, seconds = state["tokens"], state["loss_tokens"], state["train_seconds"]
        if state["warm"] is not None and state["train_seconds"] > state["warm"][2]:
            tokens, loss_tokens, seconds = (state[k] - w for k, w in zip(("tokens", "loss_tokens", "train_seconds"), state["warm"]))
        seconds = max(seconds, 1e-9)
        metrics = {
            "step": step,
            "eval_loss": eval_loss,
            "train_loss": sum(report_losses) / len(report_losses),
            LEARNING_RATE: lr,
            "tokens_per_sec": tokens / seconds,
            "loss_tokens_per_sec": loss_tokens / seconds,
            **peak_memory(device),
            STATUS: TrialStatus.COMPLETED if done else TrialStatus.RUNNING,
            "history": history,
        }
        if not math.isfinite(eval_loss):
            metrics.update({STATUS: TrialStatus.NAN, ERROR: f"eval loss is {eval_loss} at step {step}"})
            reporter.report(metrics, None)
            return metrics
        if first_report:
            metrics["derived"] = derived
            first_report = False
            if replay:
                metrics.update(history=replay["history"] + history, evals_replay=replay["evals"])
                replay = None
        if done:
            metrics.update(train_seconds=state["train_seconds"], load_seconds=load_seconds)
        state["evals"].append({k: metrics[k] for k in ("step", "eval_loss", "tokens_per_sec", "loss_tokens_per_sec")})
        with _scratch() as folder:
            save_checkpoint(folder, model, optimizer, schedule, state, fast)
            reporter.report(metrics, str(folder))
        history, report_losses = [], []
    return metrics


@contextmanager
def _scratch() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="lora-sweep-ckpt-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Ray Tune entry point


class TuneReporter:
    """Reports through ray.tune (only ray.tune.* works inside a Tune trainable in Ray 2.60).

    Restores from Tune's own checkpoint of this trial (a paused and resumed trial), else from
    `resume` (a trial continued by `python -m sweep resume` or retried after its worker died).
    """

    def __init__(self, resume: str | None = None):
        self.resume = resume

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield self.resume if self.resume and os.path.isdir(self.resume) else None
            return
        with checkpoint.as_directory() as folder:
            yield folder


def tune_trial(config: dict[str, Any], base: TrialSpec) -> None:
    """The Ray Tune trainable: `config` is what Optuna sampled; `base` the sweep's fixed settings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Trials of different sizes come and go on a shared GPU: expandable segments keep the caching
    # allocator from fragmenting (and from reserving far more than it allocates).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    spec = base.with_sampled(config)
    run(spec, TuneReporter(spec.resume_checkpoint))
