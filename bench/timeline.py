"""Where each GPU's time went in a finished sweep (issue 17, item 1): per GPU, a timeline of trial
starts and ends, base-model loads and idle gaps, with the GPU's utilisation drawn over it.

    python3 bench/timeline.py --redraw results.json [--outdir DIR]   # PNGs from a result file's saved timelines

    from timeline import read_rows, timeline
    rows = read_rows("sqlite:////tmp/x/mlflow.db", "my-sweep")        # the sweep's MLflow child runs
    summary = timeline(rows, samples, start, end, "gpu-timeline.png")  # per-GPU busy fraction, idle gaps

What a trial's bars mean (from what the sweep logs, nothing added for this):
- a lone trial's child run starts when Ray Tune starts the trial, before its worker loads the base
  model: load = [start, start + load_seconds], then training (with eval and checkpoints) to its end;
- a cohort member's run starts when the worker adds it (params `cohort`, `cohort_size`), after the
  base is loaded: load = [start - load_seconds, start] (the first member of a worker carries the base
  load; later members only their adapter's set-up), training = [start, end].
The GPU is the `gpu_ids` param Ray gave the trial (a trial on several GPUs is drawn on each); with
more than one `ray_node`, lanes are named node/GPU. Busy = the union of every bar on the GPU; an
idle gap is a stretch of at least `min_gap` seconds with no bar. Utilisation samples (nvidia-smi)
give a second, independent figure: the share of samples with utilisation > 0 and their mean.

The arithmetic (merge, gaps, busy_fraction, segments, summarise) is pure and unit-tested
(tests/unit/test_timeline.py); MLflow and matplotlib are imported only where used. matplotlib is
not among the GPU host's staged wheels: there `draw` records why it drew nothing, the result file
keeps the rows and samples, and `--redraw` makes the PNGs afterwards on any machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable

Interval = tuple[float, float]


# ----------------------------------------------------------------------------------------------
# pure arithmetic


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, non-overlapping union of [a, b) intervals (empty or reversed ones dropped)."""
    out: list[list[float]] = []
    for a, b in sorted((a, b) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def clip(intervals: Iterable[Interval], start: float, end: float) -> list[Interval]:
    return [(max(a, start), min(b, end)) for a, b in intervals if min(b, end) > max(a, start)]


def gaps(intervals: Iterable[Interval], start: float, end: float, min_gap: float = 0.0) -> list[Interval]:
    """The stretches of [start, end) no interval covers, at least `min_gap` long."""
    out, at = [], start
    for a, b in merge(clip(intervals, start, end)):
        if a - at >= min_gap and a > at:
            out.append((at, a))
        at = max(at, b)
    if end - at >= min_gap and end > at:
        out.append((at, end))
    return out


def busy_fraction(intervals: Iterable[Interval], start: float, end: float) -> float:
    """Share of [start, end) covered by at least one interval."""
    if end <= start:
        return 0.0
    return sum(b - a for a, b in merge(clip(intervals, start, end))) / (end - start)


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def is_member(row: dict[str, Any]) -> bool:
    """A cohort member (its worker logged `cohort`), not a lone trial."""
    return row.get("cohort") not in (None, "", "None")


def segments(row: dict[str, Any]) -> tuple[Interval, Interval]:
    """(load, train) intervals of one trial, in its own clock (epoch seconds); see the module text."""
    start, end = _num(row.get("start")), _num(row.get("end"))
    load = max(0.0, _num(row.get("load_seconds")))
    end = max(end, start)
    if is_member(row):
        return (start - load, start), (start, end)
    cut = min(start + load, end)
    return (start, cut), (cut, end)


def lanes_of(row: dict[str, Any], several_nodes: bool = False) -> list[str]:
    """The timeline lanes (GPUs) a trial ran on: gpu0, gpu1, ...; node/gpu0 across Ray nodes; cpu without a GPU."""
    ids = [g.strip() for g in str(row.get("gpu_ids") or "none").split(",") if g.strip() and g.strip() != "none"]
    names = [f"gpu{g}" for g in ids] or ["cpu"]
    if several_nodes:
        node = str(row.get("ray_node") or "local")[:8]
        names = [f"{node}/{n}" for n in names]
    return names


def match_samples(lanes: list[str], samples: list[dict[str, Any]]) -> tuple[dict[str, list[dict]], str]:
    """Utilisation samples ({t, gpu, util, mem_mib}) per lane, and how they were matched: by GPU index
    (lane gpuN <- nvidia-smi index N); one physical GPU behind every lane (logical GPUs); or in order."""
    by_gpu: dict[str, list[dict]] = {}
    for s in samples:
        by_gpu.setdefault(f"gpu{s['gpu']}", []).append(s)
    if not by_gpu or not lanes:
        return {lane: [] for lane in lanes}, "no samples"
    bare = {lane: lane.rsplit("/", 1)[-1] for lane in lanes}
    if all(b in by_gpu for b in bare.values()):
        return {lane: by_gpu[b] for lane, b in bare.items()}, "gpu index"
    if len(by_gpu) == 1:
        only = next(iter(by_gpu.values()))
        return {lane: only for lane in lanes}, "one physical GPU for every lane"
    ordered = sorted(by_gpu)
    return {lane: by_gpu[ordered[i]] if i < len(ordered) else [] for i, lane in enumerate(sorted(lanes))}, "in order"


def sample_stats(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    mine = [s for s in samples if start <= s["t"] <= end]
    if not mine:
        return {"samples": 0}
    return {"samples": len(mine), "util_busy_fraction": round(sum(s["util"] > 0 for s in mine) / len(mine), 4),
            "mean_util": round(sum(s["util"] for s in mine) / len(mine) / 100, 4),
            "peak_mem_gib": round(max(s.get("mem_mib", 0) for s in mine) / 1024, 2)}  # fmt: skip


def summarise(rows: list[dict[str, Any]], samples: dict[str, list[dict]], start: float, end: float,
              lanes: list[str] | None = None, min_gap: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Per lane: trials, busy fraction (union of bars), load and training seconds, idle gaps
    (seconds from the sweep's start), and the utilisation samples' figures."""
    several = len({r.get("ray_node") for r in rows if r.get("ray_node")}) > 1
    per: dict[str, list[dict]] = {lane: [] for lane in lanes or []}
    for r in rows:
        for lane in lanes_of(r, several):
            per.setdefault(lane, []).append(r)
    out: dict[str, Any] = {}
    for lane, mine in sorted(per.items()):
        parts = [segments(r) for r in mine]
        bars = [seg for pair in parts for seg in pair]
        idle = gaps(bars, start, end, min_gap)
        out[lane] = {
            "trials": len(mine),
            "busy_fraction": round(busy_fraction(bars, start, end), 4),
            "load_busy_fraction": round(busy_fraction([p[0] for p in parts], start, end), 4),
            "load_seconds": round(sum(b - a for (a, b), _ in parts), 1),
            "train_seconds": round(sum(b - a for _, (a, b) in parts), 1),
            "idle_seconds": round(sum(b - a for a, b in idle), 1),
            "idle_gaps": len(idle),
            "longest_gap": round(max((b - a for a, b in idle), default=0.0), 1),
            "gaps": [[round(a - start, 1), round(b - start, 1)] for a, b in idle],
            **sample_stats(samples.get(lane, []), start, end),
        }
    return out


# ----------------------------------------------------------------------------------------------
# the edges: MLflow in, PNG out


def read_rows(mlflow_uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every child run of the experiment's sweeps: what the timeline and the benchmarks read. A trial's
    `tokens` / `loss_tokens` are the tokens it trained, counted (non-padding input tokens; reply
    tokens), as its newest checkpoint in the sweep folder holds them (counted_tokens); None when it
    left none. They are never tokens_per_sec x train_seconds: a trial's tokens_per_sec leaves out
    its first step (a compiled trial's compile) and train_seconds does not, so that product counted
    more tokens than were trained."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # the driver failed before it started the sweep (its log says why)
        return []
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    sweep_dirs = {r.info.run_id: r.data.tags.get("sweep_dir") for r in runs if "mlflow.parentRunId" not in r.data.tags}
    rows = []
    for r in runs:
        if "mlflow.parentRunId" not in r.data.tags:
            continue
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        rows.append({
            "sweep": experiment, "trial": t.get("trial"), "status": t.get("trial_status"), "error": (t.get("error") or "")[-300:],
            "start": r.info.start_time / 1000, "end": (r.info.end_time or r.info.start_time) / 1000,
            "gpu_ids": p.get("gpu_ids"), "ray_node": p.get("ray_node"), "cohort": p.get("cohort") or t.get("cohort"), "cohort_size": p.get("cohort_size"),
            "gpu_share": p.get("gpu_share"), "reused": p.get("base_model_reused") == "True",
            "estimated_vram_gb": _float(p.get("estimated_vram_gb", m.get("estimated_vram_gb"))),
            "lora_r": p.get("lora_r"), "lora_alpha": p.get("lora_alpha"), "target_modules": p.get("target_modules"),
            "learning_rate": p.get("learning_rate"), "batch": p.get("batch"),
            **{k: m.get(k) for k in ("eval_loss", "load_seconds", "train_seconds", "tokens_per_sec", "loss_tokens_per_sec", "peak_vram_gb", "peak_vram_reserved_gb", "member_vram_share_gb")},
        })  # fmt: skip
        rows[-1].update(counted_tokens(sweep_dirs.get(t["mlflow.parentRunId"]), t.get("trial")))
    return sorted(rows, key=lambda x: (x["start"], x["trial"] or ""))


def counted_tokens(sweep_dir: str | None, trial: str | None) -> dict[str, Any]:
    """The tokens a trial trained as counted by its cohort member (trainable/cohort.py adds every
    micro-batch's non-padding tokens) and saved with its newest checkpoint,
    <sweep_dir>/trials/<trial>/step-N/member.json, with N, the step they were counted at. A
    completed trial's last checkpoint is its last step's (its final evaluation saves one), so its
    count is every token it trained; a trial stopped between evaluations trained more than its
    count. No checkpoint (or no sweep folder): None."""
    out: dict[str, Any] = {"tokens": None, "loss_tokens": None, "tokens_at_step": None}
    if not sweep_dir or not trial:
        return out
    from core.contract import MEMBER_STATE, TRIALS_DIR
    from trainable.cohort_worker import latest_checkpoint

    checkpoint = latest_checkpoint(Path(sweep_dir) / TRIALS_DIR / trial)
    if checkpoint is None:
        return out
    state = json.loads((Path(checkpoint) / MEMBER_STATE).read_text())
    return {"tokens": state.get("tokens"), "loss_tokens": state.get("loss_tokens"), "tokens_at_step": state.get("step")}


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def draw(rows: list[dict[str, Any]], samples: dict[str, list[dict]], start: float, end: float, path: str | Path,
         title: str = "", lanes: list[str] | None = None, min_gap: float = 1.0) -> str | None:  # fmt: skip
    """One panel per GPU: a bar per trial (load hatched, training solid; red edge: not completed),
    utilisation on the right axis, idle gaps shaded. Returns the PNG's path, or why none was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        return f"not drawn: {exc} (redraw with: python3 bench/timeline.py --redraw RESULT.json)"
    several = len({r.get("ray_node") for r in rows if r.get("ray_node")}) > 1
    per: dict[str, list[dict]] = {lane: [] for lane in lanes or []}
    for r in rows:
        for lane in lanes_of(r, several):
            per.setdefault(lane, []).append(r)
    names = sorted(per) or ["(no trials)"]
    heights = [max(1.6, 0.28 * len(per.get(n, [])) + 1.0) for n in names]
    fig, axes = plt.subplots(len(names), 1, figsize=(12, sum(heights) + 0.8), sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})
    span = max(end - start, 1e-9)
    for ax, lane in zip(axes[:, 0], names):
        mine = sorted(per.get(lane, []), key=lambda r: (segments(r)[0][0], r.get("trial") or ""))
        for y, r in enumerate(mine):
            (la, lb), (ta, tb) = segments(r)
            edge = "black" if r.get("status") == "completed" else "red"
            ax.barh(y, lb - la, left=la - start, height=0.8, color="tab:orange", alpha=0.55, hatch="//", edgecolor=edge, linewidth=0.4)
            ax.barh(y, tb - ta, left=ta - start, height=0.8, color="tab:blue", alpha=0.8, edgecolor=edge, linewidth=0.4)
            ax.text(max(la, start) - start, y, f" {r.get('trial') or '?'} {str(r.get('sweep') or '').rsplit('-', 1)[-1]}", va="center", ha="left", fontsize=6, color="white" if tb - ta > 0.06 * span else "black")
        bars = [seg for r in mine for seg in segments(r)]
        for a, b in gaps(bars, start, end, min_gap):
            ax.axvspan(a - start, b - start, color="0.6", alpha=0.25, linewidth=0)
        ax.set_ylim(-0.8, max(len(mine), 1) - 0.2)
        ax.set_yticks([])
        util = sorted((s["t"] - start, s["util"]) for s in samples.get(lane, []) if start <= s["t"] <= end)
        twin = ax.twinx()
        if util:
            twin.plot([u[0] for u in util], [u[1] for u in util], color="tab:green", linewidth=0.8)
        twin.set_ylim(0, 105)
        twin.set_ylabel("util %", fontsize=7)
        twin.tick_params(labelsize=7)
        busy = busy_fraction(bars, start, end)
        stats = sample_stats(samples.get(lane, []), start, end)
        extra = f", util>0 {stats['util_busy_fraction']:.0%}, mean util {stats['mean_util']:.0%}" if stats.get("samples") else ", no utilisation samples"
        ax.set_title(f"{lane}: {len(mine)} trials, busy {busy:.0%} (trial bars){extra}", fontsize=8, loc="left")
    axes[-1, 0].set_xlim(0, span)
    axes[-1, 0].set_xlabel("seconds since the sweep started")
    handles = [Patch(facecolor="tab:orange", alpha=0.55, hatch="//", label="base-model load"), Patch(facecolor="tab:blue", alpha=0.8, label="training (+eval)"),
               Patch(facecolor="0.6", alpha=0.25, label=f"idle >= {min_gap:g} s"), Patch(facecolor="tab:green", label="GPU utilisation")]  # fmt: skip
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=4)
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def timeline(rows: list[dict[str, Any]], samples: list[dict[str, Any]], start: float, end: float, png: str | Path | None,
             title: str = "", lanes: list[str] | None = None, min_gap: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Summary (per GPU) + PNG, and what `--redraw` needs: the rows' timing fields and the samples."""
    several = len({r.get("ray_node") for r in rows if r.get("ray_node")}) > 1
    names = sorted(set(lanes or []) | {lane for r in rows for lane in lanes_of(r, several)})
    by_lane, how = match_samples(names, samples)
    out: dict[str, Any] = {"start": start, "end": end, "min_gap": min_gap, "samples_matched_by": how,
                           "per_gpu": summarise(rows, by_lane, start, end, names, min_gap)}  # fmt: skip
    out["png"] = draw(rows, by_lane, start, end, png, title, names, min_gap) if png else None
    keep = ("sweep", "trial", "status", "start", "end", "load_seconds", "gpu_ids", "ray_node", "cohort")
    out["data"] = {"title": title, "lanes": names, "rows": [{k: r.get(k) for k in keep} for r in rows],
                   "samples": [{k: (round(v, 2) if k == "t" else v) for k, v in s.items()} for s in samples]}  # fmt: skip
    return out


def _timelines(node: Any, where: str = "") -> Iterable[tuple[str, dict]]:
    """Every saved timeline in a result file (a dict with "data" and "per_gpu"), wherever it sits."""
    if isinstance(node, dict):
        if "per_gpu" in node and "data" in node:
            yield where, node
        for k, v in node.items():
            yield from _timelines(v, f"{where}-{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _timelines(v, f"{where}-{i}")


def main() -> None:
    ap = argparse.ArgumentParser(description="draw the per-GPU timelines a benchmark result file holds")
    ap.add_argument("--redraw", required=True, help="a result file of bench/packing.py or bench/multi_gpu.py")
    ap.add_argument("--outdir", default=None, help="where the PNGs go (default: beside the file)")
    args = ap.parse_args()
    path = Path(args.redraw)
    result = json.loads(path.read_text())
    outdir = Path(args.outdir) if args.outdir else path.parent
    for where, tl in _timelines(result):
        d = tl["data"]
        png = outdir / f"{path.stem}-{where.replace('/', '-')}.png"
        print(draw(d["rows"], match_samples(d["lanes"], d["samples"])[0], tl["start"], tl["end"], png, d.get("title", where), d["lanes"], tl.get("min_gap", 1.0)))


if __name__ == "__main__":
    main()
