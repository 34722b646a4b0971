"""`python -m sweep report DIR`: a self-contained HTML report and its PNG plots, also logged as
artifacts of the sweep's parent MLflow run.

    history.png     the objective of every trial in order, and the best so far
    parallel.png    parallel coordinates: each trial's hyperparameters, coloured by the objective
    importance.png  hyperparameter importance (Optuna's fANOVA) for the objective
    pareto.png      eval_loss against peak memory and against tokens/sec, the Pareto fronts marked
    curves.png      eval and train loss curves of the top trials
    report.html     Optuna's interactive charts (plotly: optimisation history, parallel coordinates,
                    hyperparameter importance, slices; plotly.js inline, so it works offline), the
                    Pareto and loss-curve PNGs, and a table of every trial (status, key metrics,
                    config) whose labels link to the trials' MLflow runs. Without plotly it shows
                    the five PNGs instead, and says so in one line.

One format per quantity (`fmt`), in the table, the summary lines and the plots' labels alike.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Callable

from core.contract import EVAL_LOSS, TOKENS_PER_SEC, TRAIN_LOSS, TrialStatus, finite, is_sweep_trial, rate_text as _rate
from sweep.readback.results import SweepResult, not_run, open_sweep, pareto
from sweep.folder import run_link

Write = Callable[[str], None]
TOP_CURVES = 5
MIN_FOR_IMPORTANCE = 10  # completed trials below which importance is noise (the report says so)


def fmt(name: str, value: Any) -> str:
    """A number as the report writes that quantity everywhere: losses 1.2346, tokens/s 12,345,
    memory 21.50 (GB), learning rates 2e-4 (as in trial names), seconds 517; others 4 digits."""
    if not finite(value):
        return ""
    if name in ("learning_rate", "lr"):
        return _rate(float(value))
    if name.endswith("tokens_per_sec"):
        return f"{value:,.0f}"
    if name.endswith("_gb"):
        return f"{value:.2f}"
    if name.endswith("_seconds"):
        return f"{value:.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if name.endswith("loss") or name == EVAL_LOSS:
        return f"{value:.4f}"
    return f"{value:.4g}"


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
        if not pts:  # no legend entry for a status no trial ended with
            continue
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
    axes = []  # (title, values scaled to 0..1, category labels, [(position, tick label)])
    for name in names:
        values, labels, log = _axis_values(sub, name)
        finite_v = [v for v in values if v == v]
        if log:  # placed by log10, labelled with the real values (2e-4, not -3.7)
            values = [math.log10(v) if v == v else v for v in values]
            finite_v = [math.log10(v) for v in finite_v]
        lo, hi = (min(finite_v), max(finite_v)) if finite_v else (0.0, 1.0)
        span = (hi - lo) or 1.0
        ticks = []
        if not labels:
            ticks = [(-0.06, fmt(name, 10**lo if log else lo)), (1.04, fmt(name, 10**hi if log else hi))]
            if log:  # the decades in between
                ticks += [((d - lo) / span, fmt(name, 10.0**d)) for d in range(math.ceil(lo + 0.15), math.floor(hi - 0.15) + 1)]
        axes.append((name + (" (log scale)" if log else ""), [(v - lo) / span if v == v else float("nan") for v in values], labels, ticks))
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
    for x, (_, _, labels, ticks) in enumerate(axes):
        ax.axvline(x, color="grey", linewidth=0.6)
        if labels:
            for j, label in enumerate(labels):
                ax.text(x, j / max(len(labels) - 1, 1), f" {label}", fontsize=7, va="center")
        for y, text in ticks:
            if 0 <= y <= 1:  # a decade between the ends: a tick on the axis
                ax.plot([x - 0.04, x + 0.04], [y, y], color="grey", linewidth=0.6)
                ax.text(x + 0.06, y, text, fontsize=7, va="center")
            else:
                ax.text(x, y, text, fontsize=7, ha="center")
    sm = cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(smin, smax))
    fig.colorbar(sm, ax=ax, label=metric)
    ax.set_title("Parallel coordinates (dotted: pruned or stopped, at their last value)")
    return _save(fig, path)


def own_study(study: Any) -> Any:
    """An in-memory copy of the study with the sweep's own ended trials (core.contract.is_sweep_trial:
    a warm start's are left out, and duplicate proposals, which repeat a trial's result, and lost
    ones): what the importance and Optuna's charts are computed from. Each keeps its number (t008 is
    trial 8 in the charts too): an entry left out leaves a FAIL entry in its place, which the charts skip."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    copy = optuna.create_study(directions=study.directions)
    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)  # a running sweep's too
    gap = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL)
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        copy.add_trial(t if t.state in ended and is_sweep_trial(t) else gap)
    return copy


def varied_params(study: Any) -> list[str]:
    """The hyperparameters whose value differs between completed trials, categorical ones
    (method, target_modules, batch) as well as numbers: what importance can rank."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    common = set.intersection(*(set(t.params) for t in complete)) if complete else set()
    return sorted(k for k in common if len({str(t.params[k]) for t in complete}) > 1)


def importances(study: Any, multi: bool) -> dict[str, float]:
    """fANOVA importance (seeded) of every varied hyperparameter for the (first) objective; {}
    when there are fewer than three completed trials or nothing varied."""
    import optuna

    study = own_study(study)
    params = varied_params(study)
    if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < 3 or not params:
        return {}
    target = (lambda t: t.values[0]) if multi else None
    found = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target, params=params)
    return {k: float(v) for k, v in found.items()}


def plot_importance(study: Any, multi: bool, metric: str, path: Path) -> Path:
    found = importances(study, multi)
    if not found:
        return _note(path, "Hyperparameter importance", "fANOVA needs three completed trials whose hyperparameters differ")
    fig, ax = _figure(7, 0.5 + 0.45 * len(found))
    names = list(found)[::-1]
    ax.barh(names, [found[n] for n in names], color="tab:blue")
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


INTERACTIVE = ("Optimisation history", "Parallel coordinates", "Hyperparameter importance")  # the PNGs Optuna's charts replace in the page
NO_PLOTLY = "Interactive charts need plotly, which is not installed here (pip install plotly); the static charts follow."


def interactive_charts(study: Any, multi: bool, metric: str) -> list[tuple[str, str]] | None:
    """Optuna's plotly charts of the sweep's own completed trials, as (title, HTML div) without
    plotly.js (the page carries one copy); None when plotly cannot be imported."""
    try:
        import plotly  # noqa: F401
        import optuna.visualization as vis
    except ImportError:
        return None
    import optuna

    own = own_study(study)
    complete = own.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return [("Interactive charts", "<p>No completed trial yet.</p>")]
    target = {"target": (lambda t: t.values[0]) if multi else None, "target_name": metric}
    params = varied_params(own)
    figures = [
        ("Optimisation history", lambda: vis.plot_optimization_history(own, **target)),
        ("Parallel coordinates", lambda: vis.plot_parallel_coordinate(own, params=params or None, **target)),
        ("Slices: the objective against each hyperparameter", lambda: vis.plot_slice(own, params=params or None, **target)),
    ]
    if len(complete) >= 3 and params:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # the same numbers as importance.png
        figures.insert(2, ("Hyperparameter importance", lambda: vis.plot_param_importances(own, evaluator=evaluator, params=params, **target)))
    logs = [name for name, d in complete[0].distributions.items() if getattr(d, "log", False)]
    spans = {n: (min(v), max(v)) for n in logs if (v := [t.params[n] for t in complete if n in t.params and t.params[n] > 0])}
    formatted = {*logs, metric}  # axes labelled by fmt
    out = []
    for title, draw in figures:
        fig = draw()
        _format_ticks(fig, formatted, spans)
        fig.update_layout(height=460, margin={"t": 60, "b": 70})
        out.append((title, fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})))
    return out


def _format_ticks(fig: Any, formatted: set[str], spans: dict[str, tuple[float, float]]) -> None:
    """The parallel coordinates' axes named in `formatted` (log-scale hyperparameters such as
    learning_rate, and the objective) labelled in the report's format: real values (2e-4, not an
    exponent) on a log scale, losses 1.2346; the slices' log x axes the same way (`spans`: each
    log-scale hyperparameter's lowest and highest value among the trials)."""
    names = list(fig.layout.xaxis.ticktext or ())  # Optuna's parallel coordinates: one x position per axis, ticks as annotations
    kept, seen = [], set()
    for note in fig.layout.annotations or ():
        axis = names[int(note.x)] if isinstance(note.x, int | float) and 0 <= note.x < len(names) and float(note.x).is_integer() else None
        if axis in formatted:
            try:
                note.text = fmt(axis, float(note.text))
            except (TypeError, ValueError):
                pass
            if (axis, note.text) in seen:  # an end beside the decade it rounds to
                continue
            seen.add((axis, note.text))
        kept.append(note)
    fig.layout.annotations = kept
    for key in [k for k in fig.layout if k.startswith("xaxis")]:  # the slices: one x axis per hyperparameter
        axis = fig.layout[key]
        name = axis.title.text if axis.title else None
        if axis.type == "log" and name in formatted and name in spans:
            lo, hi = spans[name]
            ticks = [m * 10.0**d for d in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
            ticks = [t for t in ticks if lo / 1.5 <= t <= hi * 1.5]
            axis.update(tickmode="array", tickvals=ticks, ticktext=[fmt(name, t) for t in ticks])


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return f"<script type='text/javascript'>{get_plotlyjs()}</script>"


def _completed_warning(completed: int) -> str:
    if completed >= MIN_FOR_IMPORTANCE:
        return ""
    trials = "trial" if completed == 1 else "trials"
    return (f"<p class='warning'>Only {completed} {trials} completed: with fewer than {MIN_FOR_IMPORTANCE}, hyperparameter importance is "
            "noise (and the other charts are anecdotes); read them as hints, not findings.</p>")  # fmt: skip


def _mlflow_anchor(href: str, text: str, links: dict[str, Any]) -> str:
    """A link into the MLflow UI; its address part follows the page's "MLflow UI at" field (UI_SCRIPT)."""
    ui = links.get("ui") or ""
    path = href[len(ui) :] if ui and href.startswith(ui) else ""
    return f"<a class='mlflow' data-path='{html.escape(path)}' href='{html.escape(href)}' target='_blank'>{html.escape(text)}</a>"


# The links to MLflow are written for the address `mlflow ui --port 5000` serves (or the tracking
# server's). A UI served elsewhere: the field at the top changes every link (kept in the browser);
# a page opened from MLflow's own artifact view takes that server's address.
UI_SCRIPT = """<script>(function () {
  var field = document.getElementById('mlflow-ui'), key = 'lora-sweep.mlflow-ui ' + field.defaultValue;
  function apply(ui) {
    ui = ui.replace(/\\/+$/, '');
    document.querySelectorAll('a.mlflow').forEach(function (a) { if (a.dataset.path) a.href = ui + a.dataset.path; });
  }
  var served = /^blob:(https?:\\/\\/[^/]+)/.exec(location.href) || (/\\/(get-artifact|ajax-api)/.test(location.href) ? [0, location.origin] : null);
  var saved = null;
  try { saved = localStorage.getItem(key); } catch (e) {}
  var ui = served ? served[1] : (saved || field.value);
  field.value = ui; apply(ui);
  field.addEventListener('change', function () { apply(field.value); try { localStorage.setItem(key, field.value); } catch (e) {} });
})();</script>"""


def _ui_field(links: dict[str, Any]) -> str:
    command = html.escape(links.get("command") or "")
    serve = f" (<code>{command}</code> serves it there)" if command else ""
    return f"<p class='note'>MLflow UI at <input id='mlflow-ui' size='32' value='{html.escape(links.get('ui') or '')}'>{serve}; the links follow it.</p>"


def _html(cfg: Any, meta: dict, result: SweepResult, plots: dict[str, Path], charts: list[tuple[str, str]] | None, links: dict[str, Any],
          study_trials: list[Any] = ()) -> str:  # fmt: skip
    metric = cfg.search.metric
    memory = "peak_vram_gb" if any(finite(r.get("peak_vram_gb")) for r in result.trials) else "peak_rss_gb"
    numbers = [metric, TRAIN_LOSS, TOKENS_PER_SEC, memory]
    head = ["trial", "status", "step", metric, TRAIN_LOSS, "tokens/sec", f"{memory.removesuffix('_gb')} (GB)", "config", "note"]
    lines = []
    for r in result.trials:
        link = run_link(links, r["run_id"]) if r.get("run_id") else None
        label = _mlflow_anchor(link, r["label"], links) if link else html.escape(r["label"])
        cells = [f"<td>{label}</td>", f"<td>{html.escape(str(r['status']))}</td>", f"<td class='num'>{r['step'] if r['step'] is not None else ''}</td>",
                 *(f"<td class='num'>{fmt(k, r.get(k))}</td>" for k in numbers),
                 f"<td>{html.escape(r['summary'])}</td>", f"<td>{html.escape((r.get('error') or '')[-160:])}</td>"]  # fmt: skip
        cls = "best" if result.best and r["label"] == result.best["label"] else r["status"]
        lines.append(f"<tr class='{cls}'>" + "".join(cells) + "</tr>")
    counts = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    best = result.best
    best_line = f"best: {best['label']} {metric} {fmt(metric, best[metric])} ({html.escape(best['summary'])})" if best else "best: none completed"
    pareto_line = ""
    if cfg.multi_objective:
        names = [m for m, _ in cfg.objectives]
        pareto_line = "<p>Pareto set (" + html.escape(", ".join(f"{m} {d}" for m, d in cfg.objectives)) + "): " + html.escape(
            ", ".join(f"{r['label']} (" + ", ".join(fmt(m, r[m]) for m in names) + ")" for r in result.pareto) or "none") + "</p>"  # fmt: skip
    runs = f" {_mlflow_anchor(links['runs'], 'The trials in MLflow', links)}." if links.get("runs") else ""
    where = _ui_field(links) if links.get("runs") else ""
    warning = _completed_warning(result.counts.get(TrialStatus.COMPLETED, 0))
    gaps = "".join(f"<p class='note'>{html.escape(label)} {html.escape(why)}.</p>" for label, why in not_run(study_trials))
    static = {name: p for name, p in plots.items() if charts is None or name not in INTERACTIVE}
    interactive = "" if charts is None else "".join(f"<h2>{html.escape(title)}</h2>{div}" for title, div in charts)
    note = f"<p class='note'>{NO_PLOTLY}</p>" if charts is None else ""
    figures = "".join(f"<figure><img alt='{name}' src='{_embed(p)}'><figcaption>{name}</figcaption></figure>" for name, p in static.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(cfg.name)}: sweep report</title>
{_plotly_js() if charts is not None else ''}
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ddd;padding:3px 6px;text-align:left}} td.num{{text-align:right}} th{{background:#f4f4f4}} tr.best{{background:#e6f4ea;font-weight:bold}}
tr.pruned,tr.stopped{{color:#777}} tr.failed,tr.oom,tr.nan,tr.infeasible{{color:#b00}} img{{max-width:100%}} figure{{margin:1em 0}}
p.warning{{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}}</style></head>
<body><h1>{html.escape(cfg.name)}</h1>
<p>{html.escape(meta.get('started', ''))}; model {html.escape(cfg.model.id)}; {cfg.search.algorithm} search, {cfg.search.scheduler.type} scheduler;
{len(result.trials)} trials: {html.escape(counts)}.{runs}</p>{where}<p><b>{best_line}</b></p>{pareto_line}{gaps}
{warning}{note}{interactive}
{figures}
<h2>All trials</h2><table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{''.join(lines)}</table>
{UI_SCRIPT if where else ''}</body></html>"""


def build_report(folder: Path, write: Write = print, log_to_mlflow: bool = True) -> Path:
    from sweep.config import ConfigError
    from sweep.folder.checks import writable

    folder = Path(folder).resolve()
    sweep = open_sweep(folder)
    cfg, meta, study, client, result = sweep.cfg, sweep.meta, sweep.study, sweep.client, sweep.result
    out = folder / "report"
    problems = writable(out, "report", fix=f"make {folder} writable, or copy it to a folder you can write and run report on the copy")
    if problems:  # a read-only sweep folder (a read-only mount, another user's sweep): before any plot is drawn
        raise ConfigError(str(folder), problems)
    out.mkdir(exist_ok=True)
    metric, mode = cfg.search.metric, cfg.search.mode
    plots = {
        "Optimisation history": plot_history(result, metric, mode, out / "history.png"),
        "Parallel coordinates": plot_parallel(result, metric, mode, out / "parallel.png"),
        "Hyperparameter importance": plot_importance(study, cfg.multi_objective, metric, out / "importance.png"),
        "Pareto fronts": plot_pareto(result, out / "pareto.png"),
        "Loss curves of the top trials": plot_curves(result, client, metric, out / "curves.png"),
    }
    charts = interactive_charts(study, cfg.multi_objective, metric)
    report = out / "report.html"
    report.write_text(_html(cfg, meta, result, plots, charts, sweep.mlflow_links, study.get_trials(deepcopy=False)))
    if log_to_mlflow:
        sweep.folder.log_artifacts(client, meta["parent_run_id"], out, "report")
    interactive = f"{len(charts)} interactive charts" if charts is not None else "no interactive charts (plotly is not installed)"
    write(f"report: {report}  ({len(result.trials)} trials, {len(plots)} plots, {interactive}; also in MLflow, run {meta['parent_run_id']}, artifacts/report)")
    return report
