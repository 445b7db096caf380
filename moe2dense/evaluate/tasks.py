"""The offline demo tasks, generated deterministically from the held-out split, and their lm-eval YAML.

Two kinds, one registry entry each:
- `perplexity` (one task per corpus domain): loglikelihood_rolling over every held-out document of the domain;
  bits per byte, byte and word perplexity.
- `continuation` (one task over all domains): a held-out passage and its true continuation among `distractors`
  continuations cut from other documents of the same domain; acc, acc_norm and acc_mutual_info.

The data (jsonl) and a manifest are a stage output that DVC hashes. The YAML is rendered just before evaluation
with absolute paths, because lm-eval resolves relative `data_files` against the process CWD and a DVC experiment
runs in a different directory than the one that generated the data.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import yaml

from moe2dense.params import ContinuationParams

log = logging.getLogger(__name__)

MANIFEST = "tasks.json"
PPL_PREFIX = "demo_ppl_"
CONTINUATION = "demo_continuation"
_WS = re.compile(r"\s")


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _cut(text: str, at: int) -> int:
    """The first whitespace at or after `at` (so passages end on a word boundary), or the end of the text."""
    m = _WS.search(text, at)
    return m.start() if m else len(text)


def windows(text: str, context_chars: int, continuation_chars: int) -> list[tuple[str, str]]:
    """Consecutive (context, continuation) pairs covering `text`; pairs whose continuation is shorter than half
    its target length (the document's tail) are dropped."""
    pairs, i = [], 0
    while i < len(text):
        mid = _cut(text, i + context_chars)
        end = _cut(text, mid + continuation_chars)
        context, continuation = text[i:mid].strip(), text[mid:end].strip()
        if context and len(continuation) >= continuation_chars // 2:
            pairs.append((context, continuation))
        i = end
    return pairs


def continuation_items(docs: pl.DataFrame, opts: ContinuationParams, seed: int) -> list[dict[str, Any]]:
    """Multiple-choice items for one domain's documents (doc_id, text). Deterministic in (docs, opts, seed)."""
    pairs = [(doc_id, ctx, cont) for doc_id, text in docs.sort("doc_id").select("doc_id", "text").iter_rows()
             for ctx, cont in windows(text, opts.context_chars, opts.continuation_chars)]
    if not pairs:
        return []
    doc_ids = np.array([p[0] for p in pairs])
    domain = docs["domain"][0]
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    items = []
    for idx in rng.permutation(len(pairs)):
        doc_id, context, truth = pairs[idx]
        others = np.flatnonzero(doc_ids != doc_id)
        if len(others) < opts.distractors:
            continue
        choices = [pairs[j][2] for j in rng.choice(others, opts.distractors, replace=False)]
        label = int(rng.integers(opts.distractors + 1))
        choices.insert(label, truth)
        items.append({"id": f"{doc_id}:{idx}", "domain": domain, "context": context, "choices": choices,
                      "label": label})
        if len(items) == opts.items_per_domain:
            break
    return items


def build_demo_tasks(eval_text: str | Path, out: Path, opts: ContinuationParams, seed: int) -> dict[str, Any]:
    """Write the demo task data into `out` and return the manifest (also written as tasks.json)."""
    docs = pl.read_parquet(eval_text, columns=["doc_id", "domain", "text"])
    if docs.is_empty():
        raise ValueError(f"{eval_text} holds no held-out documents: raise prepare.split.eval")
    tasks: dict[str, Any] = {}
    mc: list[dict[str, Any]] = []
    for domain in sorted(docs["domain"].unique()):
        part = docs.filter(pl.col("domain") == domain).sort("doc_id")
        name = f"{PPL_PREFIX}{domain}"
        _jsonl(out / f"{name}.jsonl", [{"doc_id": d, "text": t} for d, t in part.select("doc_id", "text").iter_rows()])
        tasks[name] = {"kind": "perplexity", "file": f"{name}.jsonl", "domain": domain, "docs": part.height,
                       "chars": int(part["text"].str.len_chars().sum())}
        items = continuation_items(part, opts, seed)
        if len(items) < opts.items_per_domain:
            log.warning("continuation: domain %r gives %d of %d items (needs held-out documents with other "
                        "documents to draw %d distractors from)", domain, len(items), opts.items_per_domain,
                        opts.distractors)
        mc.extend(items)
    if mc:
        _jsonl(out / f"{CONTINUATION}.jsonl", mc)
        tasks[CONTINUATION] = {"kind": "continuation", "file": f"{CONTINUATION}.jsonl", "items": len(mc),
                               "choices": opts.distractors + 1,
                               "domains": sorted({item["domain"] for item in mc})}
    else:
        log.warning("continuation: no domain has enough held-out documents; the task is left out")
    manifest = {"tasks": tasks}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ---------------------------------------------------------------- lm-eval YAML, one renderer per kind
def _perplexity_yaml(name: str, data: Path) -> dict[str, Any]:
    return {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                            for m, agg in (("bits_per_byte", "bits_per_byte"),
                                           ("byte_perplexity", "weighted_perplexity"),
                                           ("word_perplexity", "weighted_perplexity"))]}


def _continuation_yaml(name: str, data: Path) -> dict[str, Any]:
    return {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "label", "target_delimiter": " ",
            # acc_mutual_info scores log p(choice | context) - log p(choice): whether the model *uses* the
            # context, which separates weak models that raw acc leaves near chance.
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm", "acc_mutual_info")]}


RENDERERS: dict[str, Callable[[str, Path], dict[str, Any]]] = {
    "perplexity": _perplexity_yaml,
    "continuation": _continuation_yaml,
}


def render_yaml(tasks_dir: str | Path, include_dir: Path, datasets_cache: Path) -> list[str]:
    """Write one lm-eval YAML per demo task into `include_dir`, pointing at the data in `tasks_dir` by absolute
    path; return the task names."""
    tasks_dir = Path(tasks_dir).resolve()
    if not (tasks_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{tasks_dir / MANIFEST} not found: run `dvc repro eval_tasks` first")
    manifest = json.loads((tasks_dir / MANIFEST).read_text())
    for name, task in manifest["tasks"].items():
        data = tasks_dir / task["file"]
        config = {"task": name, "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(datasets_cache)},
                  "test_split": "test", **RENDERERS[task["kind"]](name, data),
                  "metadata": {"version": 1.0}}
        (include_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return list(manifest["tasks"])
