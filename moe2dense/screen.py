"""The design-space screen: every scoring x grouping x scaling x K combination assembled from one shared
calibration and scored by held-out perplexity, without distillation (the paper's Section 4 study).

Each configuration's result is cached by content: a JSON file named by the sha256 of the configuration and of the
inputs it reads (teacher weights, calibration, scores, held-out rows), so adding one K value computes only the new
configurations and a changed input recomputes all. At K == k grouping is irrelevant (pure pruning): such a
configuration is counted and evaluated once per scoring x scaling, with grouping `none`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from moe2dense import markdown
from moe2dense.heldout import perplexity as heldout_perplexity
from moe2dense.io import atomic_file, digest_paths

log = logging.getLogger(__name__)

PURE = "none"  # the grouping of a K == k configuration


@dataclass(frozen=True, order=True)
class Config:
    method: str
    experts: int  # K
    grouping: str  # PURE when K == k
    scaling: str

    @property
    def name(self) -> str:
        return f"{self.method}-K{self.experts}-{self.grouping}-{self.scaling}"


def default_experts(k: int, E: int) -> list[int]:
    """k, 2k, 4k, ... up to E (E itself included)."""
    values, K = [], k
    while K < E:
        values.append(K)
        K *= 2
    return values + [E]


def configurations(methods: Iterable[str], groupings: Iterable[str], scalings: Iterable[str],
                   experts: Iterable[int], k: int) -> list[Config]:
    """The screen's grid, K == k collapsed to one grouping (`none`), in a stable order."""
    out = {Config(m, K, PURE if K == k else g, s)
           for m, g, s, K in itertools.product(methods, groupings, scalings, experts)}
    return sorted(out)


def check_experts(experts: Iterable[int], k: int, E: int) -> None:
    bad = [K for K in experts if not k <= K <= E]
    if bad:
        raise ValueError(f"screen.experts {bad} out of range: every K must satisfy k <= K <= E, i.e. {k} <= K <= {E}"
                         " (k = router top-k, E = experts per layer)")


def cache_key(cfg: Config, inputs: str, settings: dict[str, Any]) -> str:
    blob = json.dumps({"config": asdict(cfg), "inputs": inputs, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class ScreenInputs:
    """Everything a configuration is built from, loaded once."""

    teacher_dir: Path
    calibration: Path
    adapter: Any
    stats: dict
    shared_gate_mean: dict
    rows: np.ndarray
    batch_rows: int
    methods: tuple[str, ...]  # the screen's scoring methods
    options: dict[str, dict]  # method -> its score.options (selection.score_options)
    _scores: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def scores(self):
        """The score frame of `methods` (and their merge-by scores), computed once, by the function stage score
        uses; selection and plans read it as select and group read scores/scores.parquet."""
        if self._scores is None:
            from moe2dense.selection import score_frame

            self._scores = score_frame(self.stats, self.methods, self.options)
        return self._scores


def evaluate_config(cfg: Config, inp: ScreenInputs, orders: dict) -> dict[str, Any]:
    """Select, plan, assemble into a temp dir, load and score one configuration."""
    from transformers import AutoModelForCausalLM

    from moe2dense.assemble import assemble
    from moe2dense.checkpoint import CheckpointReader
    from moe2dense.plan import build_plan
    from moe2dense.selection import routed_mass_kept, select_from_scores

    k = inp.adapter.top_k
    t0 = time.perf_counter()
    key = (cfg.method, cfg.experts)
    if key not in orders:  # selection is shared by every grouping x scaling of a (method, K)
        orders[key] = select_from_scores(inp.scores, cfg.method, cfg.experts, k)
    order = orders[key]
    with CheckpointReader(inp.teacher_dir) as reader:
        plan = build_plan(inp.adapter, inp.stats, order, scores=inp.scores, score_method=cfg.method,
                          group_method="output" if cfg.grouping == PURE else cfg.grouping, blocks=None,
                          align=False, scaling=cfg.scaling, reader=reader, calibration=inp.calibration,
                          shared_gate_mean=inp.shared_gate_mean)
    t_plan = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moe2dense-screen-") as tmp:
        summary = assemble(inp.teacher_dir, plan, tmp, progress=False, card="screen")
        t_asm = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ppl = heldout_perplexity(model, inp.rows, inp.batch_rows)
    t_eval = time.perf_counter()
    mass = float(np.mean([routed_mass_kept(inp.stats[layer], order[layer]) for layer in order]))
    return {**asdict(cfg), "config": cfg.name, "perplexity": round(ppl, 6),
            "log_perplexity": round(math.log(ppl), 6), "routed_mass_kept": round(mass, 6),
            "num_parameters": summary["num_parameters"],
            "seconds": {"select_plan": round(t_plan - t0, 3), "assemble": round(t_asm - t_plan, 3),
                        "evaluate": round(t_eval - t_asm, 3)}}


def run_screen(configs: list[Config], inp: ScreenInputs, cache_dir: Path, inputs_digest: str,
               progress: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """Every configuration's result (from the cache when present) and the names of those computed now."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {"rows": int(inp.rows.size), "options": inp.options}
    results, computed, orders = [], [], {}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per configuration would bury the screen's own
    try:
        for cfg in tqdm(configs, desc="screen", unit="config", disable=not progress):
            res, fresh = _cached_or_evaluated(cfg, inp, cache_dir / f"{cache_key(cfg, inputs_digest, settings)}.json",
                                              orders)
            results.append(res)
            if fresh:
                computed.append(cfg.name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return results, computed


def _cached_or_evaluated(cfg: Config, inp: ScreenInputs, path: Path, orders: dict) -> tuple[dict[str, Any], bool]:
    """The configuration's result and whether it was computed now (else read from its cache file `path`)."""
    if path.is_file():
        return json.loads(path.read_text()), False
    start = time.perf_counter()
    res = evaluate_config(cfg, inp, orders)
    res["seconds"]["total"] = round(time.perf_counter() - start, 3)  # for the overhead budget (bench/)
    with atomic_file(path) as fh:  # written per configuration: an interrupted screen resumes here
        json.dump(res, fh, sort_keys=True)
    log.info("%s: perplexity %.3f", cfg.name, res["perplexity"])
    return res, True


INPUT_PATHS = ("calibration", "scores", "data/prepared/packed/eval.parquet")


def load_inputs(root: str | Path = ".", *, eval_tokens: int, batch_rows: int, methods: Iterable[str],
                score_params) -> ScreenInputs:
    """The shared inputs of a screen of scoring `methods` in a pipeline workspace `root` (after `dvc repro score`),
    with their options from `score_params` (params.score)."""
    from moe2dense.selection import score_options

    from moe2dense.arch import get_adapter
    from moe2dense.calibrate.store import read_meta, read_stats
    from moe2dense.distill.data import load_rows, seq_len_of
    from moe2dense.teacher.load import teacher_config
    from moe2dense.teacher.source import teacher_checkpoint

    root = Path(root)
    rows = load_rows(root / INPUT_PATHS[2], limit=max(1, eval_tokens // seq_len_of(root / INPUT_PATHS[2])))
    calibration = root / "calibration"
    return ScreenInputs(teacher_dir=teacher_checkpoint(root / "models/teacher"), calibration=calibration,
                        adapter=get_adapter(teacher_config(root / "models/teacher")),
                        stats=read_stats(calibration),
                        shared_gate_mean=read_meta(calibration).get("shared_gate_mean", {}),
                        rows=rows, batch_rows=batch_rows, methods=tuple(methods),
                        options=score_options(score_params, methods))


def inputs_digest(root: str | Path, inp: ScreenInputs) -> str:
    """Content key of the screen's inputs: the teacher's weights plus calibration, scores and held-out rows."""
    root = Path(root)
    return digest_paths([inp.teacher_dir / "model.safetensors" if (inp.teacher_dir / "model.safetensors").exists()
                         else inp.teacher_dir] + [root / p for p in INPUT_PATHS])


# ---------------------------------------------------------------- outputs
def results_table(results: list[dict[str, Any]]):
    """One row per configuration, best (lowest perplexity) first; ties by name. Without the wall-clock `seconds`:
    the table is a DVC output and must be byte-identical for the same inputs (see `timings`)."""
    import polars as pl

    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in results]
    # Columns in name order: a result computed now and one read back from the cache (JSON, sorted keys) list their
    # keys in different orders, and the Parquet bytes would depend on which configurations were cached.
    columns = sorted({k for r in rows for k in r})
    return pl.DataFrame(rows).select(columns).sort(["perplexity", "config"])


def timings(results: list[dict[str, Any]], computed: list[str]) -> dict[str, Any]:
    """Per-configuration seconds of the configurations computed in this run (cached ones cost nothing now), for
    the untracked timings/screen.json."""
    now = set(computed)
    per_config = {r["config"]: r["seconds"] for r in results if r["config"] in now}
    return {"computed": len(per_config), "cached": len(results) - len(per_config),
            "seconds_total": round(sum(s["total"] for s in per_config.values()), 3), "configurations": per_config}


def results_markdown(table, best: int) -> str:
    cols = ["config", "method", "experts", "grouping", "scaling", "perplexity", "routed_mass_kept"]
    top = [[f"{v:.4g}" if isinstance(v, float) else v for v in row]
           for row in table.head(best).select(cols).iter_rows()]
    Ks = sorted(table["experts"].unique())
    per_method = []
    for method in sorted(table["method"].unique()):
        sub = table.filter(table["method"] == method)
        cells = []
        for K in Ks:
            hit = sub.filter(sub["experts"] == K)
            cells.append(f"{hit['perplexity'].min():.4g} ({hit.row(0, named=True)['grouping']}, "
                         f"{hit.row(0, named=True)['scaling']})" if hit.height else "—")
        per_method.append([method, *cells])
    lines = [f"# Design-space screen: {table.height} configurations", "",
             "Held-out perplexity of the assembled student, before distillation; lower is better.", "",
             f"## Best {min(best, table.height)}", "", *markdown.table(cols, top), "",
             "## Best per scoring method and K", "", *markdown.table(["method", *(f"K={K}" for K in Ks)], per_method)]
    return "\n".join(lines) + "\n"


def plot_perplexity_vs_k(table, path) -> None:
    """Best perplexity over grouping x scaling per K, one line per scoring method."""
    import polars as pl

    from moe2dense.plots import DPI, _grid, _title

    fig, (ax,), _, _ = _grid(1, 6.0, 3.6, top=1.0, right=2.2)
    for method in sorted(table["method"].unique()):
        best = (table.filter(table["method"] == method).group_by("experts").agg(pl.col("perplexity").min())
                .sort("experts"))
        ax.plot(best["experts"], best["perplexity"], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(table["experts"].unique()), [str(K) for K in sorted(table["experts"].unique())])
    ax.set_xlabel("experts kept per layer (K)")
    ax.set_ylabel("held-out perplexity (best grouping x scaling)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    _title(fig, "Design-space screen: perplexity vs K before distillation")
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})  # a path or a file object
