"""A worker: one loaded base model, its cohort kept full of trials (every trial of a sweep trains here).

    run_worker(WorkerSpec(base=trial_spec, method="lora", capacity=4, worker="w0"), source)

The worker loads the base model once (trainable/cohort.py) and fills its free slots with the trials
a `MemberSource` hands out (in a sweep: sweep/engine/source.py, which asks Optuna and writes MLflow). Each
micro-step trains every member; at a member's eval steps it is evaluated, checkpointed to its own
folder and reported, and the source answers whether it is pruned. A member that completes, is
pruned, ends with a NaN or is stopped leaves, and its slot takes the next trial without reloading
the base.

Faults lose no member:
- an OOM in a cohort step sheds the largest member (saved at its last optimizer step and handed
  back to the source, to join a cohort later, or to run alone once it was shed twice); the cohort
  shrinks by one and the others redo the step. Only a member that OOMs alone ends `oom` (the
  shrinking was its doing, so the worker's capacity comes back).
- a non-finite loss ends that member only.
- the base model failing to load ends the first trial taken `failed` (or `oom`), with its error.
- any other exception in training ends the members `failed`, with the error, and propagates.
- losing the driver (the source cannot be reached: DriverLost) ends nothing: the members stay open,
  and the sweep retries them (a worker that died, sweep.engine.workers) or `resume` continues them.

Halts (the source's `halt()`, read before every micro-step): `stop` (`python -m sweep stop`, Ctrl-C,
SIGTERM: the STOP file) saves every member at its current optimizer step and ends it `stopped`, to be
continued by `resume`; `time` (search.time_budget) ends every member `stopped` where it is, as the
time budget ends a lone trial. Either way no new member joins and the worker ends.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

from core.contract import CHECKPOINT_PREFIX, ERROR, LEARNING_RATE, MEMBER_STATE, STATUS, STEP, WORKER_STATE, TrialStatus, summary
from core.rules import COHORT_FOLD_TOKENS, cohort_fold
from core.schema import TrainSection
from core.request import TrialRequest
from trainable.device import is_oom, peak_memory


class MemberSource(Protocol):
    """Where a worker's trials come from and where their results go."""

    def take(self, worker: str, method: str, members: int) -> TrialRequest | None:
        """The next trial for a worker of `method` that holds `members` members (continued ones
        first, then new ones from the sampler), or None when there is none to take now."""

    def give_back(self, task: TrialRequest) -> None:
        """A trial taken but not training here (it does not fit, or an OOM shed it): queue it again."""

    def waiting_alone(self, method: str) -> bool:
        """A trial waits to run alone: workers stop refilling so that one of them empties."""

    def exhausted(self, method: str) -> bool:
        """No trial for `method` is left to hand out, now or later: the worker may end."""

    def checkpoint_dir(self, task: TrialRequest) -> str:
        """The folder that holds this trial's member checkpoints (durable, shared by the workers)."""

    def begin(self, task: TrialRequest, params: dict[str, Any]) -> None:
        """The trial starts (or continues) on a worker: `params` are its derived params."""

    def report(self, task: TrialRequest, metrics: dict[str, Any]) -> bool:
        """An evaluation (a lone trial's report, core.contract names); True: prune the trial."""

    def end(self, task: TrialRequest, metrics: dict[str, Any]) -> None:
        """The trial leaves the cohort with metrics['trial_status']: completed, pruned, stopped, nan, oom or failed."""

    def halt(self) -> str | None:
        """'stop' (sweep stop / Ctrl-C: checkpoint, stay resumable), 'time' (time budget), or None."""


@dataclass(frozen=True)
class BaseSpec:
    """The sweep's settings every worker starts from: the model, the data, the train section (with
    train.compile decided by the driver), and where the worker runs."""

    model_id: str
    revision: str | None
    data_dir: str
    train: TrainSection
    threads: int = 1
    embeddings: str = "frozen"  # model.embeddings: auto | full | new_tokens | frozen
    template_ids: tuple[int, ...] = ()  # special tokens the data uses (rows new_tokens trains)
    max_seq_len: int = 1024
    gpu_share: float | None = None  # the fraction of a GPU this worker holds (1: a whole one); None: no GPU
    gpu_bytes: int | None = None  # the GPU size that share is of (resources.gpu_memory_gb); None: the device's
    stop_file: str | None = None  # `python -m sweep stop` writes it: every member checkpoints and stops


@dataclass(frozen=True)
class WorkerSpec:
    base: BaseSpec  # the sweep's fixed settings (model, data, train, max_seq_len, threads, stop file)
    method: str  # lora | qlora: the quantization of this worker's base model
    capacity: int  # the most members at once
    worker: str = "w0"  # the worker's name (its Ray Tune trial id in a sweep)
    budget: Any = None  # core.estimate.CohortBudget: memory check before a member joins; member shares
    poll_seconds: float = 0.5  # wait between asks when there is nothing to train yet


@dataclass
class _Live:
    """What the worker keeps about a member beside the cohort's own Member."""

    task: TrialRequest
    slot: int
    train: TrainSection
    seconds: float = 0.0  # wall time of the cohort steps it took part in
    warm: tuple[int, int, float] | None = None  # tokens, loss tokens, seconds after its first step
    reported: int = 0  # history entries already reported
    evals: list[dict[str, Any]] = field(default_factory=list)
    replay: bool = False  # restored: its first report re-sends what it logged before
    load_seconds: float = 0.0


def latest_checkpoint(folder: str | Path | None) -> str | None:
    """The newest complete member checkpoint (step-NNNNNN/ with member.json) under `folder`."""
    if not folder or not Path(folder).is_dir():
        return None
    done = sorted(p for p in Path(folder).glob(f"{CHECKPOINT_PREFIX}*") if (p / MEMBER_STATE).exists())
    return str(done[-1]) if done else None


def _train_of(base: TrainSection, hyper: dict[str, Any]) -> TrainSection:
    return base.model_copy(update={k: v for k, v in hyper.items() if k in TrainSection.model_fields})


def _load_cohort(spec: WorkerSpec) -> Any:
    tick = time.perf_counter()
    import torch
    import transformers  # noqa: F401  (timed with the imports, not with the weights)

    from trainable.cohort import Cohort
    from trainable.device import cap_memory

    phases = {"imports": time.perf_counter() - tick}
    if torch.cuda.is_available():
        tick = time.perf_counter()
        torch.cuda.init()  # the CUDA context: timed on its own, it is seconds on some hosts
        phases["CUDA"] = time.perf_counter() - tick
        # a fractional GPU (resources.gpus_per_trial below 1): past its share this worker's members
        # run out of memory here rather than take it from the workers beside it
        cap_memory(spec.base.gpu_share, spec.base.gpu_bytes)
    torch.set_num_threads(max(1, spec.base.threads))
    base, reasons = resolve_auto(spec.base.train.model_copy(update={"method": spec.method}), torch.cuda.is_available())
    micro = base.batch[0]
    cohort = Cohort(spec.base.model_id, spec.base.data_dir, base, revision=spec.base.revision, max_seq_len=spec.base.max_seq_len,
                    max_rows=max(1, spec.capacity * micro), eval_batch_size=base.eval_batch_size or micro,
                    embeddings=spec.base.embeddings, template_ids=tuple(spec.base.template_ids))  # fmt: skip
    cohort.load_phases = {**phases, **cohort.load_phases}
    cohort.auto_reasons = reasons
    return cohort


def resolve_auto(train: TrainSection, cuda: bool) -> tuple[TrainSection, dict[str, str]]:
    """The worker's `auto` fast-step settings made concrete for its hardware (core.rules): the loss
    (liger where CUDA runs and liger-kernel is installed) and the LoRA dtype (bf16 on a bf16 base).
    train.compile comes decided by the driver (it knows how long the workers train); `auto` left
    over (a worker started by hand) compiles nothing. Returns the settings and why each was chosen."""
    import importlib.util

    from core import rules
    from trainable.model import pick_device_and_dtype

    _, dtype = pick_device_and_dtype(train.dtype)
    loss, loss_why = rules.loss(train.loss, cuda, importlib.util.find_spec("liger_kernel") is not None)
    lora_dtype, lora_why = rules.lora_dtype(train.lora_dtype, str(dtype).removeprefix("torch."))
    compiled = train.compile if train.compile != "auto" else False
    return train.model_copy(update={"loss": loss, "lora_dtype": lora_dtype, "compile": compiled}), {"loss": loss_why, "lora_dtype": lora_why}


def run_worker(spec: WorkerSpec, source: MemberSource, emit: Callable[[list[dict]], None] | None = None,
               make_cohort: Callable[[WorkerSpec], Any] | None = None) -> dict[str, int]:  # fmt: skip
    """Train trials from `source` in one cohort until the source is exhausted or halts.
    `emit` receives progress lines (one per member event). Returns how many members ended how."""
    from trainable.device import reset_peak_rss

    if source.halt():
        return {}  # stopped or out of time before it started: no base model to load
    if source.exhausted(spec.method):
        return {}  # other workers took every trial: no base model to load for nothing
    from trainable import faults

    reset_peak_rss()
    started = time.perf_counter()
    try:
        cohort = (make_cohort or _load_cohort)(spec)
    except Exception as exc:
        _load_failed(spec, source, emit, exc)
        raise
    injected = faults.from_environment()  # tests only: read once, here, never in the training step
    if injected:
        cohort = faults.FaultyCohort(cohort, injected)
    return _Worker(spec, source, cohort, time.perf_counter() - started, emit).run()


def _load_failed(spec: WorkerSpec, source: MemberSource, emit: Callable[[list[dict]], None] | None, exc: Exception) -> None:
    """The base model did not load (a missing package, a bad revision, no memory): the trial this
    worker would have trained first ends with that error, as it would have alone, so the sweep
    records why rather than ending with nothing run. The worker then fails."""
    task = source.take(spec.worker, spec.method, 0)
    if task is None:
        return
    status = TrialStatus.OOM if is_oom(exc) else TrialStatus.FAILED
    error = f"worker {spec.worker} could not load the base model: {exc!r}"[:1000]
    source.begin(task, {"cohort": spec.worker, "cohort_size": spec.capacity})  # its run, with its hyperparameters
    source.end(task, {STEP: 0, STATUS: status, ERROR: error})
    if emit is not None:
        emit([{"event": "end", "trial": task.label, "text": f"{task.label} {status}", "status": str(status), "metrics": {STEP: 0, STATUS: str(status), ERROR: error}}])


class DriverLost(Exception):
    """Reporting to the driver failed (tune.report: the driver or Ray went away)."""


class _Worker:
    def __init__(self, spec: WorkerSpec, source: MemberSource, cohort: Any, load_seconds: float, emit: Any):
        loss = getattr(cohort, "loss", None)
        if spec.budget is not None and isinstance(loss, str) and loss != spec.budget.loss:
            # the memory budget counts the loss this worker runs: the driver planned for the
            # configured one (auto: the chunked loss's chunk of fp32 logits, not knowing whether the
            # worker would have liger, whose chunk is a tenth of that: core.estimate.loss_bytes)
            spec = replace(spec, budget=replace(spec.budget, loss=loss))
        self.spec, self.source, self.cohort, self.load_seconds, self.emit = spec, source, cohort, load_seconds, emit
        self.live: dict[int, _Live] = {}
        self.capacity = spec.capacity
        self.counts: Counter = Counter()
        self.events: list[dict[str, Any]] = []  # what the driver prints: {event, trial, text, ...}
        self.first = True  # the first member pays for loading the base
        self.planned: tuple[str, ...] = ()  # the members gradient checkpointing was decided for
        phases = getattr(cohort, "load_phases", None)
        if phases:
            where = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items())
            self._say("worker", "", f"worker {spec.worker}: base model loaded in {load_seconds:.1f}s ({where})")

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        try:
            while True:
                halt = self.source.halt()
                if halt:
                    self._halt(halt)
                    break
                self._fill()
                self._flush()
                if not self.live:
                    if self.source.exhausted(self.spec.method):
                        break
                    time.sleep(self.spec.poll_seconds)
                    continue
                self._step()
                self._flush()
        except DriverLost as lost:
            # the driver (or Ray) went away: its members stay open in the study, for the driver's
            # retry or `resume`, rather than end as failed for a fault of neither theirs nor ours
            raise lost.__cause__ from None
        except Exception as exc:  # the training itself failed: each member ends failed, with the error
            for slot in list(self.live):
                m = self.cohort.members[slot]
                self._end(slot, {STEP: m.step, STATUS: TrialStatus.FAILED, ERROR: f"worker {self.spec.worker}: {exc!r}"[:1000]})
            try:
                self._flush()
            except DriverLost:
                pass
            raise
        self._flush()
        return dict(self.counts)

    def _say(self, event: str, label: str, text: str, **fields: Any) -> None:
        self.events.append({"event": event, "trial": label, "text": text, **fields})

    def _flush(self) -> None:
        notes = getattr(self.source, "notes", None)  # what proposing said: duplicates, infeasible, a spent space
        if notes:
            for text in notes:
                self._say("note", text.split(" ", 1)[0] if text.startswith("t") else "", text)
            notes.clear()
        if self.events and self.emit is not None:
            try:
                self.emit(self.events)
            except Exception as exc:
                raise DriverLost() from exc
        self.events = []

    def _fill(self) -> None:
        budget = self.spec.budget
        while len(self.live) < self.capacity:
            if self.live and (any(lv.task.alone for lv in self.live.values()) or self.source.waiting_alone(self.spec.method)):
                return  # a trial that must run alone holds the worker, or waits for a worker to empty
            task = self.source.take(self.spec.worker, self.spec.method, len(self.live))
            if task is None:
                return
            if self.live and budget is not None and not budget.fits([lv.task.hyper for lv in self.live.values()] + [task.hyper]):
                self.source.give_back(task)  # it fits alone (the source judged it), not beside these
                return
            self._add(task)

    def _add(self, task: TrialRequest) -> None:
        train = _train_of(self.spec.base.train, task.hyper)
        checkpoint = task.checkpoint if task.checkpoint and Path(task.checkpoint, MEMBER_STATE).exists() else None
        tick = time.perf_counter()
        if checkpoint:
            slot = self.cohort.restore(checkpoint)
        else:
            slot = self.cohort.add(train, name=task.label)
        lv = _Live(task, slot, train, load_seconds=(self.load_seconds if self.first else 0.0) + time.perf_counter() - tick)
        self.first = False
        m = self.cohort.members[slot]
        if checkpoint:
            extra = Path(checkpoint, WORKER_STATE)
            if extra.exists():
                state = json.loads(extra.read_text())
                lv.seconds, lv.evals = state.get("seconds", 0.0), state.get("evals", [])
                lv.warm = tuple(state["warm"]) if state.get("warm") else None
            lv.replay = m.step > 0
        self.live[slot] = lv
        self._plan_checkpointing()
        self.source.begin(task, self._params(lv))
        where = f"from its checkpoint at step {m.step}" if checkpoint else "from the start"
        self._say("start", task.label, f"{task.label} start      {summary(train.model_dump())}  (worker {self.spec.worker}, {len(self.live)} of {self.capacity}, {where})")
        if m.step >= train.max_steps and lv.evals:
            # saved at its last step, but its end never recorded (the driver died): record it now
            self._report(slot, dict(lv.evals[-1]), final=True)

    def _params(self, lv: _Live) -> dict[str, Any]:
        m = self.cohort.members[lv.slot]
        micro, accum = lv.train.batch
        c = self.cohort
        info = {
            "micro_batch": micro,
            "grad_accum": accum,
            "effective_batch": micro * accum,
            "cohort_rows_per_forward": micro * cohort_fold(micro, accum, self.spec.base.max_seq_len, getattr(c, "fold_tokens", COHORT_FOLD_TOKENS)),
            "trainable_params": sum(p.numel() for p in m.params),
            "quantization": "nf4-double-quant" if self.spec.method == "qlora" else "none",
            "compute_dtype": str(getattr(c, "dtype", "")).removeprefix("torch."),
            "device": str(getattr(c, "device", "cpu")),
            "lora_targets": ",".join(sorted({n.rsplit(".", 1)[-1] for n in m.layers})),
            "lora_layers": len(m.layers),
            "embeddings": getattr(c, "embeddings", "frozen"),
            "embeddings_reason": getattr(c, "embeddings_reason", "as configured"),
            "embedding_rows_trained": sum(p.shape[0] for k, p in getattr(m, "token_rows", {}).items() if k == "embed"),
            "gradient_checkpointing": getattr(c, "checkpointing", False),
            "cohort_pass_tokens": getattr(c, "pass_tokens", None) or "one pass",  # at the member's start (re-decided as members come and go)
            "compiled_layers": getattr(c, "compiled_layers", 0),  # train.compile: decoder layers compiled around the adapters
            "loss": getattr(getattr(c, "base_train", None), "loss", "chunked"),
            "loss_reason": getattr(c, "auto_reasons", {}).get("loss", "as configured"),
            "lora_dtype": getattr(getattr(c, "base_train", None), "lora_dtype", "float32"),
            "lora_dtype_reason": getattr(c, "auto_reasons", {}).get("lora_dtype", "as configured"),
            "optimizer": type(m.optimizer).__name__,
            "tokens_per_sec_counts": "this member's non-padding input tokens per second of the cohort steps it took part in, after its first step (loss_tokens_per_sec: reply tokens only)",
            "cohort": self.spec.worker,
            "cohort_size": self.capacity,
        }
        try:
            from trainable.device import gpu_ids, ray_node

            info.update(ray_node=ray_node(), gpu_ids=gpu_ids())
        except Exception:  # no Ray here
            pass
        return info

    def _plan_checkpointing(self) -> None:
        """Gradient checkpointing for the members now live (the base setting auto): off while
        they fit the GPU without it (faster), on when they do not; re-decided as members come and
        go, by the rule the memory budget admitted them with (core.estimate.CohortBudget)."""
        members = tuple(sorted(lv.task.label for lv in self.live.values()))
        if members == self.planned or not members or self.spec.base.train.gradient_checkpointing != "auto":
            return
        self.planned = members
        budget = self.spec.budget
        if budget is not None and budget.gpu_bytes is not None:
            checkpointing, passes = budget.step_plan([lv.task.hyper for lv in self.live.values()])
            self.cohort.set_checkpointing(checkpointing)
            self.cohort.pass_tokens = passes
        else:  # no GPU share to fill: the single-trial rule over the rows one micro-step holds
            seq = self.spec.base.max_seq_len
            self.cohort.plan_checkpointing(sum(m * cohort_fold(m, a, seq, getattr(self.cohort, "fold_tokens", COHORT_FOLD_TOKENS)) for m, a in (lv.train.batch for lv in self.live.values())))

    def _step(self) -> None:
        self._plan_checkpointing()
        running = [s for s in self.cohort.running() if s in self.live]
        for slot in self.cohort.running():
            if slot not in self.live:  # a member the worker does not know (cannot happen; never train it blind)
                self.cohort.remove(slot)
        tick = time.perf_counter()
        try:
            stepped = self.cohort.step()
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._shed(str(exc).splitlines()[0][:500])
            return
        seconds = time.perf_counter() - tick
        for slot in running:
            self.live[slot].seconds += seconds
        due = []
        for slot, step in stepped.items():
            lv, m = self.live[slot], self.cohort.members[slot]
            if lv.warm is None:
                lv.warm = (m.tokens, m.loss_tokens, lv.seconds)
            if m.status == "nan":
                self._end(slot, {STEP: step, STATUS: TrialStatus.NAN, ERROR: f"train loss is not finite at step {step}", **self._history(lv)})
                continue
            if step % lv.train.eval_every == 0 or step >= lv.train.max_steps:
                due.append(slot)
        if due:
            self._evaluate(due)

    def _evaluate(self, slots: list[int]) -> None:
        losses = self.cohort.evaluate(slots)
        for slot in slots:
            self.cohort.sync(slot)
            lv, m = self.live[slot], self.cohort.members[slot]
            if m.status == "nan":
                self._end(slot, {STEP: m.step, STATUS: TrialStatus.NAN, ERROR: f"train loss is not finite at step {m.step}", **self._history(lv)})
                continue
            self._report(slot, {"eval_loss": losses[slot]}, final=m.step >= lv.train.max_steps)

    def _report(self, slot: int, metrics: dict[str, Any], final: bool) -> None:
        lv, m = self.live[slot], self.cohort.members[slot]
        eval_loss = metrics["eval_loss"]
        # train_loss: the mean over the steps since its previous evaluation (after a restore too,
        # when the history it re-sends reaches further back)
        since = max((e["step"] for e in lv.evals if e["step"] < m.step), default=0)
        new = [h for h in m.history if h[0] > since]
        tokens, loss_tokens, seconds = m.tokens, m.loss_tokens, lv.seconds
        if lv.warm is not None and lv.seconds > lv.warm[2]:
            tokens, loss_tokens, seconds = m.tokens - lv.warm[0], m.loss_tokens - lv.warm[1], lv.seconds - lv.warm[2]
        seconds = max(seconds, 1e-9)
        out = {
            STEP: m.step,
            "eval_loss": eval_loss,
            "train_loss": sum(h[1] for h in new) / len(new) if new else metrics.get("train_loss", float("nan")),
            LEARNING_RATE: new[-1][2] if new else metrics.get(LEARNING_RATE, float("nan")),
            "tokens_per_sec": metrics.get("tokens_per_sec", tokens / seconds),
            "loss_tokens_per_sec": metrics.get("loss_tokens_per_sec", loss_tokens / seconds),
            **peak_memory(getattr(self.cohort, "device", None) or _cpu()),
            STATUS: TrialStatus.COMPLETED if final else TrialStatus.RUNNING,
            **self._history(lv),
        }
        budget = self.spec.budget
        if budget is not None:
            members = [x.task.hyper for x in self.live.values()]
            out["member_vram_share_gb"] = budget.share_gb(lv.task.hyper, members)
        if lv.replay:
            out["evals_replay"] = list(lv.evals)
            lv.replay = False
        if not math.isfinite(eval_loss):
            self._end(slot, {**out, STATUS: TrialStatus.NAN, ERROR: f"eval loss is {eval_loss} at step {m.step}"})
            return
        if not any(e["step"] == m.step for e in lv.evals):
            lv.evals.append({k: out[k] for k in ("step", "eval_loss", "tokens_per_sec", "loss_tokens_per_sec")})
        self._save(slot)
        pruned = self.source.report(lv.task, out)
        tps = out["tokens_per_sec"]
        self._say("eval", lv.task.label, f"{lv.task.label} step {m.step:>4}/{lv.train.max_steps}  eval_loss {eval_loss:.4f}  train_loss {out['train_loss']:.4f}  {tps / 1000:.1f}k tok/s")
        if final:
            self._end(slot, out)
        elif pruned:
            self._end(slot, {**out, STATUS: TrialStatus.PRUNED, "history": []})

    def _history(self, lv: _Live) -> dict[str, Any]:
        m = self.cohort.members[lv.slot]
        start = 0 if lv.replay else lv.reported
        lv.reported = len(m.history)
        return {"history": [list(h) for h in m.history[start:]]}

    def _save(self, slot: int) -> str:
        lv, m = self.live[slot], self.cohort.members[slot]
        root = Path(self.source.checkpoint_dir(lv.task))
        folder = root / f"{CHECKPOINT_PREFIX}{m.step:06d}"
        if (folder / MEMBER_STATE).exists():
            # saved at this step already (a continued member stopped or shed before its next
            # optimizer step): that checkpoint holds this very state. Writing it again would
            # remove it first, and a worker killed in between left the trial no checkpoint at all
            # (its resume then started it again from step 0).
            lv.task.checkpoint = str(folder)
            return str(folder)
        if folder.exists():  # begun and never completed (its worker died while writing it)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / WORKER_STATE).write_text(json.dumps({"seconds": lv.seconds, "warm": lv.warm, "evals": lv.evals, "worker": self.spec.worker}))
        self.cohort.save(slot, folder)  # member.json last: the folder is complete from here on
        for old in root.glob(f"{CHECKPOINT_PREFIX}*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        lv.task.checkpoint = str(folder)
        return str(folder)

    def _end(self, slot: int, metrics: dict[str, Any]) -> None:
        lv = self.live.pop(slot)
        # every end carries the member's times: one stopped at the time budget or failed part-way
        # still shows its base load and training time (timelines drew no load bar without them)
        metrics = {"train_seconds": lv.seconds, "load_seconds": lv.load_seconds, **metrics}
        self.cohort.remove(slot)
        status = str(metrics.get(STATUS))
        self.counts[status] += 1
        self.source.end(lv.task, metrics)
        shown = {k: v for k, v in metrics.items() if k not in ("history", "evals_replay") and (isinstance(v, int | float | str) or v is None)}
        self._say("end", lv.task.label, f"{lv.task.label} {status}", status=status, metrics=shown)

    # -- faults and halts ------------------------------------------------------------------------

    def _size(self, slot: int) -> tuple:
        lv = self.live[slot]
        if self.spec.budget is not None:
            return (self.spec.budget.size(lv.task.hyper), lv.task.label)
        micro, _ = lv.train.batch
        return (micro, lv.train.lora_r, lv.task.label)

    def _shed(self, message: str) -> None:
        for slot in self.live:
            self.cohort.rewind(slot)
        _free_memory()
        if len(self.live) == 1:
            slot = next(iter(self.live))
            m = self.cohort.members[slot]
            self._end(slot, {STEP: m.step, STATUS: TrialStatus.OOM, ERROR: message, **self._history(self.live[slot])})
            self.capacity = self.spec.capacity  # alone it does not fit: the shrinking was its doing
            return
        victim = max(self.live, key=self._size)
        lv = self.live[victim]
        self._save(victim)
        del self.live[victim]
        self.cohort.remove(victim)
        lv.task.sheds += 1
        lv.task.alone = lv.task.sheds >= 2
        self.capacity = max(1, len(self.live))
        self.source.give_back(lv.task)
        later = "alone" if lv.task.alone else "later"
        self._say("shed", lv.task.label, f"{lv.task.label} shed       OOM in a cohort step of {len(self.live) + 1}: it runs {later}; worker {self.spec.worker} now holds up to {self.capacity}")
        _free_memory()

    def _halt(self, why: str) -> None:
        for slot in list(self.live):
            lv, m = self.live[slot], self.cohort.members[slot]
            if why == "stop" and m.step > 0:
                self._save(slot)
            self._end(slot, {STEP: m.step, STATUS: TrialStatus.STOPPED, **self._history(lv)})


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------
# Ray Tune entry point


def tune_cohort_worker(config: dict[str, Any], base: BaseSpec, source: MemberSource, capacity: int, budget: Any = None) -> None:
    """The Ray Tune trainable of a cohort worker: `config` names its method; members come from
    `source` (Optuna ask/tell and MLflow, sweep/engine/source.py). Progress lines go to the driver
    through tune.report (only ray.tune.* works inside a Tune trainable in Ray 2.60)."""
    import os

    from ray import tune

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    worker = tune.get_context().get_trial_id() or f"w{config.get('worker', 0)}"
    reports = [0]

    def emit(events: list[str]) -> None:
        reports[0] += 1
        tune.report({STEP: reports[0], STATUS: TrialStatus.RUNNING, "events": list(events)})

    spec = WorkerSpec(base=base, method=config.get("method", base.train.method), capacity=capacity, worker=worker, budget=budget)
    counts = run_worker(spec, source, emit)
    tune.report({STEP: reports[0] + 1, STATUS: TrialStatus.COMPLETED, "events": [], "members": counts})


def bound_tune_worker(base: BaseSpec, source: MemberSource, capacity: int, budget: Any = None) -> Callable[[dict[str, Any]], None]:
    """tune_cohort_worker with its arguments bound, the trainable a sweep gives Ray Tune. The
    arguments travel inside the trainable (pickled into Tune's registry in the GCS), not as
    tune.with_parameters' objects in Ray's object store: objects the driver owns there are lost
    with the local raylet, and the driver's attempt to mark them lost writes to a store that is
    gone, which ends the driver at once with status 1 (Ray's core worker: "The connection to the
    plasma store is failed. Terminate the process"), before it can record the sweep's stop. That
    is what a signal to the driver's process group, or the raylet killed alone, did (CI saw it)."""

    def worker(config: dict[str, Any]) -> None:
        tune_cohort_worker(config, base, source, capacity, budget)

    worker.__name__ = "tune_cohort_worker"  # Tune names the trials after it, as before
    return worker
