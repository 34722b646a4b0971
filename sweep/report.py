"""`python -m sweep report DIR`: a self-contained HTML report and its PNG plots, also logged as
artifacts of the sweep's parent MLflow run.

    history.png     the objective of every trial in order, and the best so far
    parallel.png    parallel coordinates: each trial's hyperparameters, coloured by the objective
    importance.png  hyperparameter importance (Optuna's fANOVA) for the objective
    pareto.png      eval_loss against peak memory and against tokens/sec, the Pareto fronts marked
    curves.png      eval and train loss curves of the top trials
    report.html     all of the above, and a table of every trial (status, key metrics, config)
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Callable

from core.contract import TrialStatus
from sweep.results import SweepResult, open_sweep, pareto
from sweep.trials import finite

Write = Callable[[str], None]
TOP_CURVES = 5


def _figure(width: float = 7, height: float = 4.2) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _note(path: Path, title: str, why: str) -> Path:
    """A plot that cannot be drawn yet says why, instead of being missing."""
    fig, ax = _figure(7, 2.5)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    return _save(fig, path)


def plot_history(result: SweepResult, metric: str, mode: str, path: Path) -> Path:
    done = [r for r in result.trials if finite(r.get(metric))]
    if not done:
        return _note(path, "Optimisation history", f"no trial has reported {metric} yet")
    done.sort(key=lambda r: r["number"])
    fig, ax = _figure()
    colours = {TrialStatus.COMPLETED: "tab:blue", TrialStatus.PRUNED: "tab:orange", TrialStatus.STOPPED: "tab:gray"}
    for status, colour in colours.items():
        pts = [r for r in done if r["status"] == status]
        ax.scatter([r["number"] for r in pts], [r[metric] for r in pts], color=colour, label=f"{status} (last value)" if status != TrialStatus.COMPLETED else str(status), s=24)
    completed = [r for r in done if r["status"] == TrialStatus.COMPLETED]
    best, xs, ys = None, [], []
    for r in completed:
        if best is None or (r[metric] < best if mode == "min" else r[metric] > best):
            best = r[metric]
        xs.append(r["number"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="black", label="best so far")
    ax.set_xlabel("trial (Optuna number)")
    ax.set_ylabel(metric)
    ax.set_title("Optimisation history")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _axis_values(result: SweepResult, name: str) -> tuple[list[float], list[str] | None, bool]:
    """Values of one study parameter on a parallel-coordinates axis: numbers, or category indices."""
    raw = [r["params"].get(name) for r in result.trials]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw if v is not None):
        positive = [v for v in raw if v is not None and v > 0]
        log = bool(positive) and len(positive) == len([v for v in raw if v is not None]) and max(positive) / min(positive) > 50
        return [float(v) if v is not None else float("nan") for v in raw], None, log
    labels = sorted({str(v) for v in raw if v is not None})
    return [float(labels.index(str(v))) if v is not None else float("nan") for v in raw], labels, False


def plot_parallel(result: SweepResult, metric: str, mode: str, path: Path) -> Path:
    import math

    import matplotlib.cm as cm

    rows = [r for r in result.trials if finite(r.get(metric))]
    names = sorted({k for r in rows for k in r["params"]})
    if len(rows) < 2 or not names:
        return _note(path, "Parallel coordinates", "needs two trials that reported the objective")
    sub = SweepResult(result.sweep_dir, result.parent_run_id, trials=rows)
    axes = []
    for name in names:
        values, labels, log = _axis_values(sub, name)
        finite_v = [v for v in values if v == v]
        if log:
            values = [math.log10(v) if v == v else v for v in values]
            finite_v = [math.log10(v) for v in finite_v]
        lo, hi = (min(finite_v), max(finite_v)) if finite_v else (0.0, 1.0)
        span = (hi - lo) or 1.0
        axes.append((name + (" (log10)" if log else ""), [(v - lo) / span if v == v else float("nan") for v in values], labels, lo, hi))
    scores = [r[metric] for r in rows]
    smin, smax = min(scores), max(scores)
    fig, ax = _figure(max(7, 1.6 * len(axes)), 4.5)
    import matplotlib

    cmap = matplotlib.colormaps["viridis_r" if mode == "min" else "viridis"]
    for i, r in enumerate(rows):
        shade = (r[metric] - smin) / ((smax - smin) or 1.0)
        ax.plot(range(len(axes)), [a[1][i] for a in axes], color=cmap(shade), alpha=0.8, linewidth=1.5 if r["status"] == TrialStatus.COMPLETED else 0.8,
                linestyle="-" if r["status"] == TrialStatus.COMPLETED else ":")  # fmt: skip
    ax.set_xticks(range(len(axes)))
    ax.set_xticklabels([a[0] for a in axes], rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    for x, (_, _, labels, lo, hi) in enumerate(axes):
        ax.axvline(x, color="grey", linewidth=0.6)
        if labels:
            for j, label in enumerate(labels):
                ax.text(x, j / max(len(labels) - 1, 1), f" {label}", fontsize=7, va="center")
        else:
            ax.text(x, -0.06, f"{lo:.3g}", fontsize=7, ha="center")
            ax.text(x, 1.04, f"{hi:.3g}", fontsize=7, ha="center")
    sm = cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(smin, smax))
    fig.colorbar(sm, ax=ax, label=metric)
    ax.set_title("Parallel coordinates (dotted: pruned or stopped, at their last value)")
    return _save(fig, path)


def plot_importance(study: Any, multi: bool, metric: str, path: Path) -> Path:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "warm_start_from" not in t.user_attrs]
    varied = {k for k in (complete[0].params if complete else {}) if len({str(t.params.get(k)) for t in complete}) > 1}
    if len(complete) < 3 or not varied:
        return _note(path, "Hyperparameter importance", "fANOVA needs three completed trials whose hyperparameters differ")
    target = (lambda t: t.values[0]) if multi else None
    importances = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target, params=sorted(varied)
    )
    fig, ax = _figure(7, 0.5 + 0.45 * len(importances))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for {metric} (fANOVA, share of variance)")
    ax.set_title("Hyperparameter importance")
    return _save(fig, path)


def plot_pareto(result: SweepResult, path: Path) -> Path:
    done = [r for r in result.trials if r["status"] == TrialStatus.COMPLETED and finite(r.get("eval_loss"))]
    memory = "peak_vram_gb" if any(finite(r.get("peak_vram_gb")) for r in done) else "peak_rss_gb"
    if not done:
        return _note(path, "Pareto fronts", "no completed trial yet")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (other, direction, label) in zip(axes, ((memory, "min", f"{memory} (lower is better)"), ("tokens_per_sec", "max", "tokens/sec (higher is better)"))):
        pts = [r for r in done if finite(r.get(other))]
        front = pareto(pts, [("eval_loss", "min"), (other, direction)])
        ax.scatter([r[other] for r in pts], [r["eval_loss"] for r in pts], color="lightgrey", label="completed trials")
        front.sort(key=lambda r: r[other])
        ax.plot([r[other] for r in front], [r["eval_loss"] for r in front], "o-", color="tab:red", label="Pareto front")
        for r in front:
            ax.annotate(r["label"], (r[other], r["eval_loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("eval_loss")
        ax.legend(fontsize=8)
    fig.suptitle("eval_loss against cost")
    return _save(fig, path)


def plot_curves(result: SweepResult, client: Any, metric: str, path: Path) -> Path:
    top = [r for r in result.trials if r["status"] == TrialStatus.COMPLETED][:TOP_CURVES]
    if not top:
        return _note(path, "Loss curves", "no completed trial yet")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=False)
    for r in top:
        for ax, name in zip(axes, ("eval_loss", "train_loss")):
            history = sorted((m.step, m.value) for m in client.get_metric_history(r["run_id"], name))
            if history:
                ax.plot([s for s, _ in history], [v for _, v in history], marker="." if name == "eval_loss" else None, label=f"{r['label']} {r['summary']}")
    for ax, name in zip(axes, ("eval_loss", "train_loss")):
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Top {len(top)} trials by {metric}")
    return _save(fig, path)


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(cfg: Any, meta: dict, result: SweepResult, plots: dict[str, Path]) -> str:
    metric = cfg.search.metric
    memory = "peak_vram_gb" if any(finite(r.get("peak_vram_gb")) for r in result.trials) else "peak_rss_gb"
    head = ["trial", "status", "step", metric if metric != "eval_loss" else "eval_loss", "train_loss", "tokens/sec", memory, "config", "note"]
    lines = []
    for r in result.trials:
        cells = [r["label"], r["status"], r["step"] if r["step"] is not None else "",
                 *(f"{r[k]:.4g}" if finite(r.get(k)) else "" for k in (metric, "train_loss", "tokens_per_sec", memory)),
                 r["summary"], (r.get("error") or "")[-160:]]  # fmt: skip
        cls = "best" if result.best and r["label"] == result.best["label"] else r["status"]
        lines.append(f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    counts = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    best = result.best
    best_line = f"best: {best['label']} {metric} {best[metric]:.4f} ({html.escape(best['summary'])})" if best else "best: none completed"
    pareto_line = ""
    if cfg.multi_objective:
        names = [m for m, _ in cfg.objectives]
        pareto_line = "<p>Pareto set (" + html.escape(", ".join(f"{m} {d}" for m, d in cfg.objectives)) + "): " + html.escape(
            ", ".join(f"{r['label']} (" + ", ".join(f"{r[m]:.4g}" for m in names) + ")" for r in result.pareto) or "none") + "</p>"  # fmt: skip
    figures = "".join(f"<figure><img alt='{name}' src='{_embed(p)}'><figcaption>{name}</figcaption></figure>" for name, p in plots.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(cfg.name)}: sweep report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ddd;padding:3px 6px;text-align:left}} th{{background:#f4f4f4}} tr.best{{background:#e6f4ea;font-weight:bold}}
tr.pruned,tr.stopped{{color:#777}} tr.failed,tr.oom,tr.nan,tr.infeasible{{color:#b00}} img{{max-width:100%}} figure{{margin:1em 0}}</style></head>
<body><h1>{html.escape(cfg.name)}</h1>
<p>{html.escape(meta.get('started', ''))}; model {html.escape(cfg.model.id)}; {cfg.search.algorithm} search, {cfg.search.scheduler.type} scheduler;
{len(result.trials)} trials: {html.escape(counts)}</p><p><b>{best_line}</b></p>{pareto_line}
{figures}
<h2>All trials</h2><table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(lines)}</table></body></html>"""


def build_report(folder: Path, write: Write = print, log_to_mlflow: bool = True) -> Path:
    folder = Path(folder).resolve()
    sweep = open_sweep(folder)
    cfg, meta, study, client, result = sweep.cfg, sweep.meta, sweep.study, sweep.client, sweep.result
    out = folder / "report"
    out.mkdir(exist_ok=True)
    metric, mode = cfg.search.metric, cfg.search.mode
    plots = {
        "Optimisation history": plot_history(result, metric, mode, out / "history.png"),
        "Parallel coordinates": plot_parallel(result, metric, mode, out / "parallel.png"),
        "Hyperparameter importance": plot_importance(study, cfg.multi_objective, metric, out / "importance.png"),
        "Pareto fronts": plot_pareto(result, out / "pareto.png"),
        "Loss curves of the top trials": plot_curves(result, client, metric, out / "curves.png"),
    }
    report = out / "report.html"
    report.write_text(_html(cfg, meta, result, plots))
    if log_to_mlflow:
        client.log_artifacts(meta["parent_run_id"], str(out), "report")
    write(f"report: {report}  ({len(result.trials)} trials, {len(plots)} plots; also in MLflow, run {meta['parent_run_id']}, artifacts/report)")
    return report
