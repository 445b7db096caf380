"""The offline demo tasks, generated deterministically from the held-out split, and their lm-eval YAML.

Two kinds, one registry entry each:
- `perplexity` (one task per corpus domain): loglikelihood_rolling over every held-out document of the domain;
  bits per byte, byte and word perplexity.
- `continuation` (one task over all domains): a held-out passage and its true next `continuation_words` words
  among `distractors` equally long, about equally frequent spans from elsewhere in the same document; acc,
  acc_norm and acc_mutual_info.

The data (jsonl) and a manifest are a stage output that DVC hashes. The YAML is rendered just before evaluation
with absolute paths, because lm-eval resolves relative `data_files` against the process CWD and a DVC experiment
runs in a different directory than the one that generated the data.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import zlib
from collections import Counter
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
_WORD = re.compile(r"(\s*)(\S+)")
_PUNCT = string.punctuation


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


Span = tuple[int, int, int]


def words(text: str) -> list[Span]:
    """(start, word_start, end) of every whitespace-delimited word of `text`: `start` takes in the whitespace
    before the word, `word_start` does not."""
    return [(m.start(), m.start(2), m.end()) for m in _WORD.finditer(text)]


def windows(spans: list[Span], context_chars: int, continuation_words: int) -> list[tuple[int, int]]:
    """Consecutive non-overlapping (first, cut) word indices over a document's `spans`: the context runs from
    word `first` through the first word that reaches `context_chars`; the true continuation is the
    `continuation_words` words from `cut` on. Windows without room for a whole continuation are dropped."""
    out, first = [], 0
    while first < len(spans):
        origin = spans[first][1]
        cut = next((i + 1 for i in range(first, len(spans)) if spans[i][2] - origin >= context_chars), len(spans))
        if cut + continuation_words > len(spans):
            break
        out.append((first, cut))
        first = cut + continuation_words
    return out


def _span(text: str, spans: list[Span], first: int, n: int) -> str:
    return text[spans[first][0]:spans[first + n - 1][2]]


def _head(span: str) -> str:
    """A span's first word without surrounding punctuation, lower-cased: distractors must differ in it from the
    truth and from each other, so none reads as an equally good continuation ("LORD," for "LORD")."""
    word = span.split()[0]
    return word.strip(_PUNCT).lower() or word


def _log_frequencies(texts: dict[str, str], spans: dict[str, list[Span]]) -> dict[str, np.ndarray]:
    """Per document, the cumulative sum of its words' log relative frequencies over all `texts` (one domain), so
    that a span's unigram log-likelihood is cum[j + n] - cum[j]."""
    counts = Counter(w for text in texts.values() for w in text.split())
    total = sum(counts.values())
    return {doc_id: np.concatenate([[0.0], np.cumsum([math.log(counts[texts[doc_id][s:e]] / total)
                                                      for _, s, e in spans[doc_id]])])
            for doc_id in texts}


def continuation_items(docs: pl.DataFrame, opts: ContinuationParams, seed: int) -> list[dict[str, Any]]:
    """Multiple-choice items for one domain's documents (doc_id, domain, text). Deterministic in (docs, opts,
    seed).

    Every choice is `continuation_words` words of the item's own document with the whitespace before them; the
    true one follows the context. The distractors are the spans elsewhere in the document (outside the context,
    the truth and the `continuation_words` words after it) whose words are, summed, about as frequent in the domain
    as the truth's, and whose first word differs from the truth's and from each other's. So all choices are equally
    long in words and about equally likely *without* the context: raw log-likelihood (acc) then measures whether a
    model uses the context, as acc_mutual_info does, instead of rewarding the shortest or most common choice
    (random spans left the 4.4M-parameter demo teacher near chance on acc).
    """
    n = opts.continuation_words
    docs = docs.sort("doc_id")
    texts = dict(docs.select("doc_id", "text").iter_rows())
    spans = {doc_id: words(text) for doc_id, text in texts.items()}
    pairs = [(doc_id, first, cut) for doc_id in texts
             for first, cut in windows(spans[doc_id], opts.context_chars, n)]
    if not pairs:
        return []
    domain = docs["domain"][0]
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    cum = _log_frequencies(texts, spans)
    items = []
    for idx in rng.permutation(len(pairs)):
        doc_id, first, cut = pairs[idx]
        text, sp = texts[doc_id], spans[doc_id]
        truth = _span(text, sp, cut, n)
        # no overlap with [first, cut + 2n): the context, the truth and the words right after it; never the
        # document's first word, which has no whitespace to separate it from the context
        starts = np.arange(1, len(sp) - n + 1)
        starts = starts[(starts + n <= first) | (starts >= cut + 2 * n)]
        # closest unigram log-likelihood first; the random permutation breaks ties
        order = rng.permutation(starts)
        c = cum[doc_id]
        order = order[np.argsort(np.abs(c[order + n] - c[order] - (c[cut + n] - c[cut])), kind="stable")]
        choices: list[str] = []
        heads = {_head(truth)}
        for j in order:
            candidate = _span(text, sp, int(j), n)
            if _head(candidate) not in heads:
                choices.append(candidate)
                heads.add(_head(candidate))
                if len(choices) == opts.distractors:
                    break
        if len(choices) < opts.distractors:
            continue
        label = int(rng.integers(opts.distractors + 1))
        choices.insert(label, truth)
        items.append({"id": f"{doc_id}:{cut}", "domain": domain, "context": text[sp[first][1]:sp[cut - 1][2]],
                      "choices": choices, "label": label})
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
            log.warning("continuation: domain %r gives %d of %d items (its held-out documents hold too few "
                        "windows (%d characters of context, %d words of continuation) with %d distinct distractors "
                        "elsewhere in their document)", domain,
                        len(items), opts.items_per_domain, opts.context_chars, opts.continuation_words,
                        opts.distractors)
        mc.extend(items)
    if mc:
        _jsonl(out / f"{CONTINUATION}.jsonl", mc)
        tasks[CONTINUATION] = {"kind": "continuation", "file": f"{CONTINUATION}.jsonl", "items": len(mc),
                               "choices": opts.distractors + 1,
                               "domains": sorted({item["domain"] for item in mc})}
    else:
        log.warning("continuation: no held-out document is long enough for one item; the task is left out")
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
            # each choice carries the document's own whitespace before it (a newline and indent in code)
            "doc_to_target": "label", "target_delimiter": "",
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
