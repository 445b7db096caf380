"""Pre-flight: every params check that needs more than one pydantic section, run before any model is loaded.

`load_params` checks each section's types and ranges; `preflight` checks what needs the teacher's shape (E experts,
router top-k: from teacher.demo, or from the checkpoint's config.json, never its weights), the calibration passes
(from the method table, moe2dense/methods.py) or the environment (lm-eval tasks and their cached datasets). It collects every problem
and raises one ParamsError, one line per problem naming the dotted key, the value and what is allowed. Every stage
(stages/_runner.py), `python -m moe2dense check-params` (the DVC stage `check`), the flows and the sweep call it.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe2dense.methods import capture_passes
from moe2dense.params import Params, ParamsError

#: Offline and telemetry-free (Hugging Face, DVC, Prefect, Ray): set before anything imports transformers / datasets /
#: huggingface_hub. The one list: stages, flows, the CLI, Ray workers and the tests set it from here (the Makefile
#: exports the same for the `dvc` and `prefect` commands it starts itself).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
               "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}


def set_offline_env() -> None:
    for var, val in OFFLINE_ENV.items():
        os.environ.setdefault(var, val)


# ---------------------------------------------------------------- calibration passes (one rule: methods.py)
def calibrated_passes(params: Params) -> set[str]:
    """Calibration passes calibrate runs: those score.methods (and score.method's merge-by score) need plus those
    group.method needs (always, even when K == k makes grouping moot, so the passes depend on params alone).
    The stages, the screen's check and `convert` all ask this."""
    return capture_passes([*params.score.methods, params.score.method], [params.group.method])


# ---------------------------------------------------------------- the teacher's shape
def teacher_shape(params: Params, root: Path) -> tuple[int, int]:
    """(router top-k, experts per layer E): teacher.demo for the demo, else the checkpoint's config.json."""
    if params.teacher.source == "demo":
        return params.teacher.demo.num_experts_per_tok, params.teacher.demo.num_experts
    set_offline_env()
    from transformers import AutoConfig

    from moe2dense.arch import get_adapter
    from moe2dense.teacher.source import resolve_checkpoint

    source = Path(params.teacher.source).expanduser()
    local = source if source.is_absolute() or not (root / source).exists() else root / source
    checkpoint = resolve_checkpoint(str(local) if local.exists() else params.teacher.source)
    adapter = get_adapter(AutoConfig.from_pretrained(str(checkpoint), local_files_only=True))
    return adapter.top_k, adapter.num_experts


def _shape_checks(params: Params, k: int, E: int) -> list[str]:
    from moe2dense.screen import check_experts
    from moe2dense.selection import check_budget

    out = []
    for check, args in ((check_budget, (params.select.experts, k, E)),
                        (check_experts, (params.screen.experts or [], k, E))):
        try:
            check(*args)
        except ValueError as err:
            out.append(str(err))
    top = params.distill.teacher_top_k
    if top is not None and top > E:
        out.append(f"distill.teacher_top_k = {top} is more than the teacher's E = {E} experts per layer; "
                   f"allowed: 1..{E}, or null (as trained: {k})")
    return out


# ---------------------------------------------------------------- the screen's grid
def _screen_checks(params: Params) -> list[str]:
    """The screen reads the shared calibration: each scoring and grouping of its grid needs a pass calibrate ran."""
    have = calibrated_passes(params)
    why = f"calibrate runs only {sorted(have)} (from score.methods and group.method)"
    out = []
    for key, names, need, fix in (
            ("screen.methods", params.screen.methods, lambda m: capture_passes([m]), "add them to"),
            ("screen.groupings", params.screen.groupings, lambda g: capture_passes([], [g]),
             "add acp or do_acp to")):
        bad = {n: sorted(need(n) - have) for n in names if need(n) - have}
        if bad:
            out.append(f"{key}: {sorted(bad)} need the {sorted({p for v in bad.values() for p in v})} calibration "
                       f"pass(es), but {why}; {fix} score.methods, or drop them from {key}")
    return out


# ---------------------------------------------------------------- evaluate
def _evaluate_checks(params: Params, lm_eval: bool) -> list[str]:
    """Demo task names need the generated tasks (stage eval_tasks) and are checked there; lm-eval task names and
    their datasets are resolved with the evaluate stage's own functions, without the demo tasks."""
    from moe2dense.evaluate.tasks import CONTINUATION, PPL_PREFIX

    def demo(task: str) -> bool:
        return task == "demo" or task.startswith(PPL_PREFIX) or task == CONTINUATION

    p = params.evaluate
    demo_shots = sorted(t for t in p.num_fewshot if demo(t))
    out = []
    if demo_shots and not any(demo(t) for t in p.tasks):
        out.append(f"evaluate.num_fewshot: {demo_shots} are demo tasks, but evaluate.tasks {p.tasks} has none")
    external = [t for t in p.tasks if not demo(t)]
    shots = {t: n for t, n in p.num_fewshot.items() if not demo(t)}
    if lm_eval and (external or shots):
        set_offline_env()
        from moe2dense.evaluate.runner import load_tasks

        try:
            load_tasks(p.model_copy(update={"tasks": external, "num_fewshot": shots}), None).close()
        except ValueError as err:
            msg = str(err)
            out.append(msg if msg.startswith("evaluate.") else f"evaluate.tasks: {msg}")
    return out


# ---------------------------------------------------------------- entry point
def problems(params: Params, root: str | Path = Path("."), *, lm_eval: bool = True) -> list[str]:
    """Every problem found (empty: all checks pass). lm_eval=False skips resolving lm-eval task names and datasets
    (~25 s: lm-eval indexes its task registry), for callers that run after a full check."""
    root = Path(root)
    out = []
    try:
        k, E = teacher_shape(params, root)
    except (OSError, ValueError, KeyError) as err:  # unresolvable source, unsupported family, quantized experts
        msg = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        out.append(msg if msg.startswith("teacher.source") else f"teacher.source: {params.teacher.source!r}: {msg}")
    else:
        out += _shape_checks(params, k, E)
    out += _screen_checks(params)
    out += _evaluate_checks(params, lm_eval)
    return out


def preflight(params: Params, root: str | Path = Path("."), *, lm_eval: bool = True,
              origin: str = "params.yaml") -> None:
    """Raise ParamsError listing every problem of `params` (see `problems`); cheap: no weights are read."""
    found = problems(params, root, lm_eval=lm_eval)
    if found:
        raise ParamsError("\n".join([f"{origin}: {len(found)} problem(s) found before any model is loaded:"]
                                    + [f"  - {p}" for p in found]))
