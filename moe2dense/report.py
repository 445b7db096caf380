"""The evaluation report: the per-model lm-eval results (eval/<model>.json) merged into one metrics file, long
tables for DVC plots, a bar chart, and a markdown summary of the whole conversion run.

A results dict (the content of metrics/eval.json) is
{model: {"path": ..., "size": {...}, task: {metric: value, metric_stderr: value, "samples": n}}}, models in the
order teacher, student, distilled; any of them may be absent. A task is a perplexity task when
it reports `bits_per_byte` (lower is better); every other task is an accuracy task (higher is better).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from moe2dense.markdown import table
from moe2dense.params import EVAL_MODELS
from moe2dense.plots import DPI, _grid, _save, _title

NOT_TASKS = ("path", "size")
ACCURACY_METRICS = ("acc", "acc_norm", "acc_mutual_info")
PERPLEXITY_METRICS = ("bits_per_byte", "word_perplexity")  # byte_perplexity = 2 ** bits_per_byte: redundant
COLORS = {"teacher": "#1f5fa8", "student": "#d95f02", "distilled": "#1b9e77"}
PARAM_SECTIONS = ("score", "select", "group", "assemble", "distill", "evaluate")
DASH = "—"
SIGNIFICANT_SE = 2.0  # a difference between two models below this many combined standard errors is noise
NOT_SIGNIFICANT = "not significant"


# ---------------------------------------------------------------- the results dict: tasks and metrics
def merge_eval(per_model: dict[str, dict]) -> dict:
    """The content of metrics/eval.json: {model: that model's eval json}, in pipeline order."""
    unknown = sorted(set(per_model) - set(EVAL_MODELS))
    if unknown:
        raise ValueError(f"merge_eval: unknown models {unknown}; expected some of {list(EVAL_MODELS)}")
    if not per_model:
        raise ValueError("merge_eval: no models given")
    return {m: per_model[m] for m in EVAL_MODELS if m in per_model}


def tasks(results: dict) -> list[str]:
    """Every task any model reports, sorted (a JSON round trip sorts them anyway)."""
    return sorted({t for result in results.values() for t in result if t not in NOT_TASKS})


def is_perplexity(results: dict, task: str) -> bool:
    return any("bits_per_byte" in result.get(task, {}) for result in results.values())


def _metrics(result: dict) -> list[str]:
    return [k for k in result if k != "samples" and not k.endswith("_stderr")]


def shown_metrics(results: dict, task: str) -> list[str]:
    """The metrics worth a table row: the known accuracy / perplexity ones present, else (an unfamiliar task)
    every metric it reports."""
    present = {m for result in results.values() for m in _metrics(result.get(task, {}))}
    known = [m for m in (PERPLEXITY_METRICS if is_perplexity(results, task) else ACCURACY_METRICS) if m in present]
    return known or sorted(present)


def plotted_metrics(results: dict, task: str) -> list[str]:
    """Perplexity tasks plot bits per byte only: word perplexity spans orders of magnitude."""
    return ["bits_per_byte"] if is_perplexity(results, task) else shown_metrics(results, task)


def _cell(results: dict, model: str, task: str, metric: str) -> tuple[float | None, float | None]:
    result = results.get(model, {}).get(task, {})
    return result.get(metric), result.get(f"{metric}_stderr")


# ---------------------------------------------------------------- tables for DVC
def long_table(results: dict) -> pl.DataFrame:
    """One row per (model, task, metric), samples left out; stderr is null where lm-eval gives none."""
    rows = [(model, task, metric, *_cell(results, model, task, metric)) for model in results
            for task in tasks(results) for metric in sorted(_metrics(results[model].get(task, {})))]
    return pl.DataFrame(rows, orient="row", schema={"model": pl.String, "task": pl.String, "metric": pl.String,
                                                    "value": pl.Float64, "stderr": pl.Float64})


def plot_rows(results: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(accuracy rows, bits-per-byte rows), each with columns label, model, value, ordered task, metric, model:
    plots/eval_accuracy.csv and plots/eval_bits_per_byte.csv for DVC's bar_horizontal template."""
    acc, bpb = [], []
    for task in tasks(results):
        ppl = is_perplexity(results, task)
        for metric in plotted_metrics(results, task):
            for model in results:
                value = _cell(results, model, task, metric)[0]
                if value is not None:
                    # the model is part of the label: the bar template draws one bar per label and revision
                    label = f"{model}: {task}" if ppl else f"{model}: {task} {metric}"
                    (bpb if ppl else acc).append((label, model, float(value)))
    schema = {"label": pl.String, "model": pl.String, "value": pl.Float64}
    return pl.DataFrame(acc, schema=schema, orient="row"), pl.DataFrame(bpb, schema=schema, orient="row")


# ---------------------------------------------------------------- figure
def eval_bars_png(results: dict, path) -> None:
    """One panel per task, bars per metric grouped by model (fixed colours), lm-eval's stderr as error bars.
    `path` is a file path or a binary file object (so a stage can write it atomically). Deterministic bytes."""
    models = list(results)
    panels = [(task, plotted_metrics(results, task)) for task in tasks(results)]
    if not panels:
        raise ValueError("eval_bars_png: the results hold no tasks")
    n_bars = len(models) * max(len(metrics) for _, metrics in panels)
    panel_w = float(np.clip(1.2 + 0.3 * n_bars, 2.6, 6.0))
    fig, axes, ncols, _ = _grid(len(panels), panel_w, 2.4, top=1.4, gap_w=0.7, gap_h=1.0)
    width = 0.8 / len(models)
    for i, (ax, (task, metrics)) in enumerate(zip(axes, panels)):
        x = np.arange(len(metrics))
        top = 0.0
        for j, model in enumerate(models):
            cells = np.array([_cell(results, model, task, m) for m in metrics], dtype=float)  # None -> nan
            value, err = cells[:, 0], cells[:, 1]
            pos = x + (j - (len(models) - 1) / 2) * width
            ax.bar(pos, np.nan_to_num(value), width, color=COLORS.get(model, "grey"), label=model)
            has = np.isfinite(value) & np.isfinite(err)
            if has.any():
                ax.errorbar(pos[has], value[has], yerr=err[has], fmt="none", ecolor="black", elinewidth=0.8,
                            capsize=2)
            top = max(top, float(np.nanmax(np.where(np.isfinite(err), value + err, value), initial=0.0)))
        ppl = is_perplexity(results, task)
        what = "bits per byte" if ppl else ("accuracy" if set(metrics) <= set(ACCURACY_METRICS) else "score")
        ax.set_title(f"{task}\n{what} ({'lower' if ppl else 'higher'} is better)", fontsize=10)
        ax.set_xticks(x, [m.replace("_", " ") for m in metrics], fontsize=8)
        ax.set_ylim(0.0, top * 1.1 or 1.0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    H = fig.get_figheight()
    fig.legend(handles, labels, loc="upper center", ncols=len(models), frameon=False, fontsize=9,
               bbox_to_anchor=(0.5, 1 - 0.5 / H))
    _title(fig, "Evaluation (lm-evaluation-harness; error bars: standard error)")
    if hasattr(path, "write"):
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    else:
        _save(fig, path)


# ---------------------------------------------------------------- markdown
def fmt(x: float | None) -> str:
    """4 significant digits; thousands separators from 10,000 on (word perplexities reach 1e7)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    if abs(x) >= 10_000:
        return f"{x:,.0f}"
    return f"{x:#.4g}".removesuffix(".")  # keep trailing zeros (2.000), not a bare point (1605.)


def mib(n_bytes: int | None) -> str:
    return DASH if n_bytes is None else fmt(n_bytes / 2**20)


def recovered(teacher: float | None, student: float | None, distilled: float | None) -> float | None:
    """(distilled - student) / (teacher - student): the share of the teacher-student gap distillation closes.
    Direction-aware by construction (a lower perplexity that moves toward the teacher's is positive too)."""
    if teacher is None or student is None or distilled is None or math.isclose(teacher, student, abs_tol=1e-12):
        return None
    return (distilled - student) / (teacher - student)


def significant(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> bool | None:
    """Whether two models' (value, stderr) differ by at least SIGNIFICANT_SE combined standard errors
    sqrt(se_a^2 + se_b^2); None when a value or a stderr is missing (nothing to test)."""
    (x, se_x), (y, se_y) = a, b
    if x is None or y is None or se_x is None or se_y is None:
        return None
    return abs(x - y) >= SIGNIFICANT_SE * math.hypot(se_x, se_y)


def recovery_cell(teacher: tuple, student: tuple, distilled: tuple) -> str:
    """The "distillation recovers" cell from each model's (value, stderr): the percentage, or NOT_SIGNIFICANT when
    the teacher-student gap or the distilled-student change is within noise (a ratio of noise means nothing)."""
    r = recovered(teacher[0], student[0], distilled[0])
    if r is None:
        return DASH
    if significant(teacher, student) is False or significant(distilled, student) is False:
        return NOT_SIGNIFICANT
    return f"{100 * r:.1f}%"


def _models_table(results: dict, metrics: dict) -> list[str]:
    teacher_params = results.get("teacher", {}).get("size", {}).get("parameters") \
        or metrics.get("assemble", {}).get("teacher_parameters")
    rows = []
    for model, result in results.items():
        size = result.get("size", {})
        n = size.get("parameters")
        share = f"{100 * n / teacher_params:.2f}%" if n and teacher_params else DASH
        rows.append([model, size.get("model_type", DASH), f"{n:,}" if n is not None else DASH, share,
                     mib(size.get("weight_bytes")), size.get("dtype", DASH)])
    return table(["model", "model_type", "parameters", "% of teacher", "weights (MiB)", "dtype"], rows, "llrrrl")


def _results_table(results: dict) -> list[str]:
    models = list(results)
    gap = all(m in results for m in ("teacher", "student", "distilled"))  # recovery needs all three
    rows = []
    for task in tasks(results):
        arrow = "↓" if is_perplexity(results, task) else "↑"
        for metric in shown_metrics(results, task):
            cells = {m: _cell(results, m, task, metric) for m in models}
            row = [task, f"{metric} {arrow}"]
            row += [DASH if v is None else fmt(v) + ("" if e is None else f" ± {fmt(e)}") for v, e in cells.values()]
            if gap:
                row.append(recovery_cell(*(cells[m] for m in ("teacher", "student", "distilled"))))
            rows.append(row)
    header = ["task", "metric", *models] + (["distillation recovers"] if gap else [])
    return table(header, rows, "ll" + "r" * (len(header) - 2))


def _distill_lines(d: dict) -> list[str]:
    if not d:
        return []
    how = [f"`{d['loss']}`" if "loss" in d else None, f"{d['tokens']:,} tokens" if "tokens" in d else None,
           f"{d['steps']} steps" if "steps" in d else None,
           f"{fmt(d['tokens_per_s'])} tokens/s" if "tokens_per_s" in d else None]
    line = "Distillation (" + ", ".join(h for h in how if h) + ")"
    before, after = d.get("heldout_kl_before"), d.get("heldout_kl_after")
    if before is not None and after is not None:
        change = f" ({100 * (after - before) / before:+.1f}%)" if before else ""
        line += f": held-out KL(teacher ‖ student) {fmt(before)} → {fmt(after)}{change}"
    return ["## Distillation", "", line + ".", ""]


def _selection_lines(metrics: dict) -> list[str]:
    s, g, a = metrics.get("select", {}), metrics.get("group", {}), metrics.get("assemble", {})
    parts = []
    if {"method", "experts_per_layer", "num_experts"} <= s.keys():
        line = f"`{s['method']}` keeps {s['experts_per_layer']} of {s['num_experts']} experts per layer"
        if "top_k" in s:
            line += f" (router top-{s['top_k']})"
        if "routed_mass_kept_mean" in s:
            line += f", which carry {100 * s['routed_mass_kept_mean']:.1f}% of the calibration routing weight"
        parts.append(line + ".")
    if g.get("pure_pruning"):
        parts.append("Pure pruning: each kept expert becomes one dense block.")
    elif "blocks_per_layer" in g:
        parts.append(f"They are merged into {g['blocks_per_layer']} dense blocks per layer by "
                     f"`{g.get('group_method')}` grouping (mean group size {fmt(g.get('mean_group_size'))}).")
    if {"model_type", "num_parameters", "teacher_parameters"} <= a.keys():
        parts.append(f"The dense `{a['model_type']}` student has {a['num_parameters']:,} parameters "
                     f"({100 * a['num_parameters'] / a['teacher_parameters']:.2f}% of the teacher's "
                     f"{a['teacher_parameters']:,}).")
    return ["## Expert selection", "", " ".join(parts), ""] if parts else []


def render_summary(results: dict, *, metrics: dict[str, dict], params: dict, figures: list[str]) -> str:
    """reports/summary.md. `metrics`: {stage: metrics/<stage>.json} for those present (select, group, assemble,
    distill); `params`: the params as a dict; `figures`: image paths relative to the summary."""
    lines = ["# moe2dense conversion report", "",
             "Models: " + ", ".join(f"{m} (`{r.get('path', '?')}`)" for m, r in results.items()) + ".", "",
             "## Models", "", *_models_table(results, metrics), "",
             "## Results", "",
             "↑ higher is better, ↓ lower is better; ± is lm-eval's standard error. \"distillation recovers\" "
             "= (distilled − student) / (teacher − student), the share of the teacher–student gap that "
             "distillation closes; \"not significant\" where the teacher–student gap or the distilled–student "
             "change is smaller than 2 standard errors of the difference, √(se₁² + se₂²) (metrics without a "
             "standard error, the perplexities, are not tested).", "", *_results_table(results), "",
             *_distill_lines(metrics.get("distill", {})), *_selection_lines(metrics)]
    sections = {k: params[k] for k in PARAM_SECTIONS if k in params}
    if sections:
        lines += ["## Params that produced this", "", "```yaml",
                  yaml.safe_dump(sections, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    if figures:
        lines += ["## Figures", "", *(f"![{Path(f).stem}]({f})\n" for f in figures)]
    return "\n".join(lines).rstrip() + "\n"
