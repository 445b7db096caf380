"""Run lm-evaluation-harness on an in-memory model, offline, and reduce its output to a fixed-shape dict.

Tasks are resolved and their datasets loaded *before* any model is: a task whose dataset is not in the local
cache fails in seconds with instructions, not after the teacher has been read.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe2dense.checkpoint import DTYPES
from moe2dense.evaluate.tasks import render_yaml
from moe2dense.params import EvaluateParams

log = logging.getLogger(__name__)

# The paper's suite and its shots (Kim et al. 2026, Table 2): the unweighted mean of these is "avg".
PAPER_SUITE = {"winogrande": 5, "hellaswag": 10, "arc_easy": 25, "arc_challenge": 25, "mmlu": 5}
OFFLINE_HELP = (
    "lm-eval task {task!r} needs its dataset {dataset!r} and this run is offline (HF_DATASETS_OFFLINE=1), "
    "and the dataset is not in the local Hugging Face cache ({cache}). On a machine with internet run\n"
    "    python -c \"import lm_eval.tasks as t; t.TaskManager().load(['{task}'])\"\n"
    "with the same HF_HOME / HF_DATASETS_CACHE, then copy that cache here (or point HF_DATASETS_CACHE at it), "
    "or drop {task!r} from evaluate.tasks. Cause: {cause}")


def expand(names: list[str], demo_tasks: list[str]) -> list[str]:
    """evaluate.tasks with the `demo` and `paper` aliases expanded, order kept, duplicates dropped."""
    aliases = {"demo": demo_tasks, "paper": list(PAPER_SUITE)}
    out: list[str] = []
    for name in names:
        for task in aliases.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def shots(task: str, overrides: dict[str, int]) -> int:
    return overrides.get(task, PAPER_SUITE.get(task, 0))


@dataclass
class LoadedTasks:
    """lm-eval task objects ready for `simple_evaluate`, plus the names the results are reported under."""

    names: list[str]
    objects: list[Any]
    manager: Any
    workdir: tempfile.TemporaryDirectory = field(repr=False)

    def close(self) -> None:
        self.workdir.cleanup()


def _dataset_of(manager: Any, task: str) -> str:
    """'path[/name]' of a registered task's dataset, for error messages (a group: its own name)."""
    cfg = getattr(manager.task_index.get(task), "cfg", None) or {}
    return "/".join(str(cfg[k]) for k in ("dataset_path", "dataset_name") if cfg.get(k)) or task


@functools.cache
def registered_tasks() -> frozenset[str]:
    """Names of lm-eval's built-in tasks, groups and tags (indexing its YAML takes ~10 s: once per process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def load_tasks(p: EvaluateParams, tasks_dir: str | Path | None) -> LoadedTasks:
    """Resolve evaluate.tasks against the generated demo tasks in `tasks_dir` and lm-eval's registry; load every
    task (and so its dataset) now. Errors name the task and what to do."""
    from lm_eval.tasks import TaskManager

    workdir = tempfile.TemporaryDirectory(prefix="moe2dense-eval-")
    try:
        return _load(p, tasks_dir, workdir)
    except BaseException:
        workdir.cleanup()
        raise


def _load(p: EvaluateParams, tasks_dir: str | Path | None, workdir: tempfile.TemporaryDirectory) -> LoadedTasks:
    from lm_eval.tasks import TaskManager

    root = Path(workdir.name)
    include, cache = root / "tasks", root / "datasets"
    include.mkdir()
    demo = render_yaml(tasks_dir, include, cache) if tasks_dir is not None else []
    names = expand(p.tasks, demo)
    if "demo" in p.tasks and not demo:
        raise ValueError("evaluate.tasks asks for `demo` but no demo tasks were generated (stage eval_tasks)")
    stray = sorted(set(p.num_fewshot) - set(names))
    if stray:
        raise ValueError(f"evaluate.num_fewshot names {stray}, which are not among the tasks run: {names}")
    external = [t for t in names if t not in demo]
    unknown = [t for t in external if t not in registered_tasks()]
    if unknown:
        raise ValueError(f"evaluate.tasks: unknown task(s) {unknown}; allowed: demo, paper ({', '.join(PAPER_SUITE)}),"
                         f" the demo tasks {demo} or any lm-eval task name (`lm_eval ls tasks`)")
    manager = TaskManager(include_path=str(include), include_defaults=bool(external))
    objects = []
    for task in names:
        try:
            loaded = manager.load([task])
        except Exception as err:  # datasets raises a variety of errors when offline and not cached
            if task in demo:
                raise
            from datasets import config as ds_config

            raise ValueError(OFFLINE_HELP.format(task=task, dataset=_dataset_of(manager, task),
                                                 cache=ds_config.HF_DATASETS_CACHE,
                                                 cause=f"{type(err).__name__}: {err}".splitlines()[0])) from err
        for leaf in loaded["tasks"].values():
            leaf.set_config(key="num_fewshot", value=shots(task, p.num_fewshot))
        objects.append(loaded["groups"].get(task) or loaded["tasks"][task])
    return LoadedTasks(names, objects, manager, workdir)


def _clean(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def reduce_results(results: dict[str, Any], names: list[str]) -> dict[str, dict[str, float]]:
    """{task: {metric: value, metric_stderr: value}} for the requested tasks (groups: their aggregate), with
    lm-eval's ',none' filter suffix dropped and N/A values left out."""
    table = {**results.get("results", {}), **results.get("groups", {})}
    out: dict[str, dict[str, float]] = {}
    for task in names:
        metrics = {}
        for key, value in table.get(task, {}).items():
            metric, _, filt = key.partition(",")
            if not filt or (v := _clean(value)) is None:
                continue
            metrics[metric if filt == "none" else f"{metric}_{filt}"] = round(v, 6)
        metrics["samples"] = int(results.get("n-samples", {}).get(task, {}).get("effective", 0)) or None
        out[task] = {k: v for k, v in metrics.items() if v is not None}
    return out


def model_size(model: torch.nn.Module) -> dict[str, Any]:
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "dtype": str(params[0].dtype).removeprefix("torch."),
            "model_type": model.config.model_type}


def load_model(path: str | Path, p: EvaluateParams):
    """The HF checkpoint at `path` (teacher pointer dirs resolved) and its tokenizer, offline, in eval mode."""
    from transformers import AutoTokenizer

    from moe2dense.teacher.load import from_checkpoint, resolve_device
    from moe2dense.teacher.source import POINTER, teacher_checkpoint

    if not any((Path(path) / f).is_file() for f in ("config.json", POINTER)):
        raise FileNotFoundError(f"{path} holds no model: run the stage that writes it first (`dvc repro`)")
    ckpt = teacher_checkpoint(path)
    dtype = "auto" if p.dtype == "auto" else DTYPES[p.dtype]
    device = resolve_device(p.device, "evaluate.device")
    model = from_checkpoint(ckpt, dtype, device)  # a quantized teacher is dequantized layer by layer as it loads
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path if (Path(path) / "tokenizer.json").exists() else ckpt),
                                              local_files_only=True)
    return model.eval(), tokenizer


def _quiet_rolling_lm():
    from lm_eval.models.huggingface import HFLM

    class QuietRollingHFLM(HFLM):
        """HFLM whose rolling-perplexity path does not open one progress bar per batch of windows."""

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or override_bs is not None,
                                                 override_bs=override_bs)

    return QuietRollingHFLM


def evaluate_model(model, tokenizer, tasks: LoadedTasks, p: EvaluateParams) -> dict[str, Any]:
    """lm-eval on the in-memory model: {"size": {...}, task: {metric: value}}. Deterministic (fixed seeds, no
    timestamps), so an unchanged model gives a byte-identical result."""
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # per-task INFO chatter; warnings still show
    # tokenizer= always: without it HFLM asks the hub for one by the model's name.
    lm = _quiet_rolling_lm()(pretrained=model, tokenizer=tokenizer, batch_size=p.batch_size, max_length=p.max_length)
    results = simple_evaluate(model=lm, tasks=tasks.objects, task_manager=tasks.manager, limit=p.limit,
                              bootstrap_iters=1000, log_samples=False,
                              random_seed=p.seed, numpy_random_seed=p.seed, torch_random_seed=p.seed,
                              fewshot_random_seed=p.seed)
    return {"size": model_size(model), **reduce_results(results, tasks.names)}
