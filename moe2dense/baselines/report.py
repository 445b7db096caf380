"""The baselines' comparison: metrics/baselines.json, the "Baselines at matched parameters" tables of
reports/baselines.md and the figure of the four distillation curves.

Every run is read from what its stages wrote: metrics/distill.json and metrics/baselines/distill_<b>.json (sizes,
held-out KL), eval/*.json (before and after distillation), timings/distill*.json (training time and speeds, which vary
run to run and are the only figures here that do), the teachers' metrics (held-out perplexity).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from moe2dense import methods as M
from moe2dense.markdown import table
from moe2dense.plots import DPI, _grid, _title
from moe2dense.report import DASH, fmt, shown_metrics, tasks

M2D = "m2d"
ROWS: tuple[str, ...] = (M2D, *M.names("baseline"))  # M2D first: the row the others are compared with
COLORS = {M2D: "#1b9e77", "d2d": "#7570b3", "random_ffn": "#d95f02", "random_init": "#999999"}
TEACHER_NAMES = {"moe": "MoE", "dense": "dense"}
LABELS = {M2D: "M2D (this pipeline's student)", "d2d": "d2d (pruned dense teacher)",
          "random_ffn": "random_ffn (teacher attention)", "random_init": "random_init"}


def headline(result: dict, results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the metrics the report shows (`results` decides which are shown)."""
    out = {}
    for task in tasks(results):
        values = {m: result[task][m] for m in shown_metrics(results, task) if m in result.get(task, {})}
        if values:
            out[task] = values
    return out


def collect(runs: dict[str, dict[str, Any]], teachers: dict[str, dict]) -> dict:
    """The content of metrics/baselines.json. `runs`: {row: {"distill": its metrics json, "timings": its timings
    json or {}, "before": eval json of the model before distillation, "after": after}}; `teachers`: {"moe" |
    "dense": {"metrics": teacher metrics json, "eval": its eval json}}."""
    evals = {f"{r}:{k}": runs[r][k] for r in runs for k in ("before", "after")}
    evals.update({f"teacher:{t}": v["eval"] for t, v in teachers.items() if v.get("eval")})
    out: dict[str, Any] = {}
    for row in (r for r in ROWS if r in runs):
        d, t = runs[row]["distill"], runs[row].get("timings") or {}
        out[row] = {
            "parameters": d["parameters"], "teacher": d["teacher"], "tokens": d["tokens"],
            "seconds": t.get("seconds"), "tokens_per_s": t.get("tokens_per_s"),
            "teacher_forward_tokens_per_s": t.get("teacher_forward_tokens_per_s"),
            "heldout_kl_before": d["heldout_kl_before"], "heldout_kl_after": d["heldout_kl_after"],
            "eval_before": headline(runs[row]["before"], evals), "eval": headline(runs[row]["after"], evals),
        }
    out["teachers"] = {name: {"parameters": v["metrics"].get("parameters"),
                              "perplexity": v["metrics"].get("perplexity"),
                              "eval": headline(v["eval"], evals) if v.get("eval") else {}}
                       for name, v in teachers.items()}
    out["cost_m2d_over_d2d"] = cost_ratio(out.get(M2D), out.get("d2d"))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def cost_ratio(m2d: dict | None, d2d: dict | None) -> dict:
    """The paper's training-cost comparison: M2D's distillation training time (the workers' step loop) over d2d's
    (below 1: M2D is cheaper),
    and the teacher forward's cost per token, MoE over dense (seconds per token = 1 / tokens per second)."""
    if not m2d or not d2d:
        return {}
    return {"seconds": _ratio(m2d["seconds"], d2d["seconds"]),
            "teacher_forward_seconds_per_token": _ratio(d2d["teacher_forward_tokens_per_s"],
                                                        m2d["teacher_forward_tokens_per_s"])}


def _n(x: Any) -> str:
    return DASH if x is None else (f"{x:,}" if isinstance(x, int) else fmt(x))


def render(b: dict) -> str:
    """reports/baselines.md."""
    rows = [r for r in ROWS if r in b]
    t = b["teachers"]
    lines = ["# Baselines at matched parameters", "",
             "Every model below has the M2D student's parameter count (the pruned dense model within 1%) and was "
             "distilled with the same `distill` params (loss, tokens, batches, lr, seed). d2d is distilled from the "
             "dense teacher, the others from the MoE teacher, so each held-out KL is against the model's own "
             "teacher.", ""]
    lines += [" ".join(f"{TEACHER_NAMES.get(name, name)} teacher: {_n(v['parameters'])} parameters, held-out "
                       f"perplexity {_n(v['perplexity'])}." for name, v in t.items()), ""]
    lines += table(["model", "parameters", "teacher", "held-out KL before", "after", "training time (s)",
                    "tokens/s", "teacher forward tokens/s"],
                   [[LABELS[r], _n(b[r]["parameters"]), b[r]["teacher"], _n(b[r]["heldout_kl_before"]),
                     _n(b[r]["heldout_kl_after"]), _n(b[r]["seconds"]), _n(b[r]["tokens_per_s"]),
                     _n(b[r]["teacher_forward_tokens_per_s"])] for r in rows], "lrlrrrrr")
    c = b.get("cost_m2d_over_d2d") or {}
    if c:
        lines += ["", f"Training cost, M2D over d2d: the workers' training time ×{_n(c.get('seconds'))}, the teacher's "
                      f"forward per token ×{_n(c.get('teacher_forward_seconds_per_token'))} (below 1: M2D is "
                      "cheaper; the paper: 1/1.6 = 0.625 for Qwen3-30B-A3B against Qwen3-32B)."]
    lines += ["", "Before → after distillation (↑ higher is better, ↓ lower is better):", ""]
    evals = {r: (b[r]["eval_before"], b[r]["eval"]) for r in rows}
    teacher_cols = [name for name in t if t[name]["eval"]]
    body = []
    for task in sorted({task for pre, post in evals.values() for task in (*pre, *post)}):
        metrics = sorted({m for pre, post in evals.values() for m in (*pre.get(task, {}), *post.get(task, {}))})
        for metric in metrics:
            arrow = "↓" if metric in ("bits_per_byte", "word_perplexity") else "↑"
            cells = [f"{_n(pre.get(task, {}).get(metric))} → {_n(post.get(task, {}).get(metric))}"
                     for pre, post in evals.values()]
            body.append([task, f"{metric} {arrow}", *cells,
                         *(_n(t[name]["eval"].get(task, {}).get(metric)) for name in teacher_cols)])
    lines += table(["task", "metric", *(r if r != M2D else "M2D" for r in rows),
                    *(f"{TEACHER_NAMES.get(name, name)} teacher" for name in teacher_cols)], body,
                   "ll" + "r" * (len(rows) + len(teacher_cols)))
    return "\n".join(lines) + "\n"


def curves_png(curves: dict[str, list[tuple[int, float]]], fh) -> None:
    """The distillation loss of each run against training tokens, one line a run (deterministic bytes)."""
    fig, (ax,), _, _ = _grid(1, 7.0, 3.6, top=0.9, left=0.9)
    for row in (r for r in ROWS if r in curves):
        tokens, loss = np.array(curves[row], dtype=float).T
        ax.plot(tokens, loss, color=COLORS[row], label=LABELS[row], linewidth=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("distillation loss (vs own teacher)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    _title(fig, "Distillation at matched parameters")
    fig.savefig(fh, format="png", dpi=DPI, metadata={"Software": None})

