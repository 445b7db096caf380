"""Evaluation: the generated demo tasks (deterministic, well-formed), lm-eval on an in-memory model with the network
blocked (its numbers pinned against a plain forward), task resolution and the offline errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from conftest import REPO
from moe2dense.evaluate.runner import expand, load_tasks, reduce_results, shots
from moe2dense.evaluate.tasks import CONTINUATION, build_demo_tasks, continuation_items, windows, words
from moe2dense.params import ContinuationParams, EvaluateParams

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


@pytest.fixture
def no_network(monkeypatch):
    """Fail any socket connect outside loopback: evaluation must never reach for a hub."""
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
            raise OSError(f"network blocked in tests: connect to {address!r}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def _docs(n_per_domain=4, words=120, seed=0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for domain in ("code", "prose"):
        for i in range(n_per_domain):
            text = " ".join(rng.choice(WORDS, words))
            rows.append({"doc_id": f"{domain}-{i}", "domain": domain, "text": text, "hash": f"{domain}{i}"})
    return pl.DataFrame(rows)


# ---------------------------------------------------------------- task generation
def test_windows_cut_on_word_boundaries():
    text = "aa bb cc dd ee ff gg hh"
    spans = words(text)
    assert [text[a:b] for a, _, b in spans] == ["aa", " bb", " cc", " dd", " ee", " ff", " gg", " hh"]
    assert [text[a:b] for _, a, b in spans[:2]] == ["aa", "bb"]
    # context: words until one ends >= 4 characters after the first's start ("aa bb"), then 2 words of truth
    assert windows(spans, 4, 2) == [(0, 2), (4, 6)]
    assert windows(words("aa bb cc"), 4, 2) == []  # no room for a whole continuation


def _unique_doc(n_words: int, doc: int) -> str:
    """Every word unique (so a span's text tells its position), a newline and indent before every 7th."""
    return "".join(("\n    " if i % 7 == 0 else " ") + f"d{doc}w{i}" for i in range(n_words)).lstrip()


def test_continuation_items_are_deterministic_and_well_formed():
    docs = pl.DataFrame([{"doc_id": f"p{d}", "domain": "prose", "text": _unique_doc(150, d)} for d in range(3)])
    opts = ContinuationParams(items_per_domain=10, distractors=3, context_chars=60, continuation_words=4)
    items = continuation_items(docs, opts, seed=1)
    assert items == continuation_items(docs, opts, seed=1)
    assert items != continuation_items(docs, opts, seed=2)
    assert len(items) == 10 and {i["label"] for i in items} > {0}
    by_doc = dict(docs.select("doc_id", "text").iter_rows())
    for item in items:
        doc_id, cut = item["id"].split(":")
        text, cut = by_doc[doc_id], int(cut)
        assert len(item["choices"]) == 4 and item["domain"] == "prose"
        truth = item["choices"][item["label"]]
        # the true continuation follows the context in its document, its own whitespace (newline, indent) kept
        assert item["context"] + truth in text and truth == text[words(text)[cut][0]:words(text)[cut + 3][2]]
        assert len(item["context"]) >= 60 and not item["context"][0].isspace()
        context_words = item["context"].split()
        first = int(context_words[0].split("w")[1])
        for j, choice in enumerate(item["choices"]):
            assert choice[0].isspace() and len(choice.split()) == 4 and choice in text  # same document
            start = int(choice.split()[0].split("w")[1])
            if j != item["label"]:  # outside the context, the truth and the 4 words after it
                assert start + 4 <= first or start >= cut + 8, (item, choice)


def test_distractors_match_the_truths_word_frequency():
    # "t" occurs 3 times, as do x, y, z, w; f 30 times; the rest once. The truth after "cc0 ... cc4" is " t": its
    # distractors are the four other words of frequency 3 (never another "t", never the frequent or rare words).
    filler = ["x", "y", "z", "w"] * 3 + ["t", "t"] + ["f"] * 30 + [f"u{i}" for i in range(10)]
    order = np.random.default_rng(0).permutation(len(filler))
    text = " ".join(["cc0", "cc1", "cc2", "cc3", "cc4", "t", "s0", "s1", *(filler[i] for i in order)])
    docs = pl.DataFrame({"doc_id": ["a"], "domain": ["prose"], "text": [text]})
    opts = ContinuationParams(items_per_domain=100, distractors=4, context_chars=16, continuation_words=1)
    item = next(i for i in continuation_items(docs, opts, seed=0) if i["id"] == "a:5")
    assert item["context"] == "cc0 cc1 cc2 cc3 cc4" and item["choices"][item["label"]] == " t"
    assert sorted(item["choices"]) == [" t", " w", " x", " y", " z"]


def test_documents_without_distinct_distractors_give_no_items():
    opts = ContinuationParams(distractors=4, context_chars=16, continuation_words=4)
    short = pl.DataFrame({"doc_id": ["a"], "domain": ["prose"], "text": [_unique_doc(14, 0)]})
    assert continuation_items(short, opts, seed=0) == []  # no words left outside context + truth + 4
    same = pl.DataFrame({"doc_id": ["a"], "domain": ["prose"], "text": [" ".join(["amen", "Amen,"] * 200)]})
    assert continuation_items(same, opts, seed=0) == []  # every span starts with the truth's first word


def test_build_demo_tasks_is_byte_identical_across_runs(tmp_path):
    path = tmp_path / "eval.parquet"
    _docs().write_parquet(path)
    opts = ContinuationParams(items_per_domain=5, distractors=3, context_chars=60, continuation_words=4)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    manifest = build_demo_tasks(path, a, opts, seed=0)
    build_demo_tasks(path, b, opts, seed=0)
    assert sorted(p.name for p in a.iterdir()) == ["demo_continuation.jsonl", "demo_ppl_code.jsonl",
                                                    "demo_ppl_prose.jsonl", "tasks.json"]
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert manifest["tasks"]["demo_ppl_prose"] == {"kind": "perplexity", "file": "demo_ppl_prose.jsonl",
                                                   "domain": "prose", "docs": 4,
                                                   "chars": sum(len(t) for t in _docs()["text"][4:])}
    assert manifest["tasks"][CONTINUATION]["items"] == 10 and manifest["tasks"][CONTINUATION]["choices"] == 4


# ---------------------------------------------------------------- task resolution and results
def test_aliases_expand_in_order_without_duplicates():
    demo = ["demo_continuation", "demo_ppl_a"]
    assert expand(["demo"], demo) == demo
    assert expand(["arc_easy", "paper", "demo_ppl_a"], demo) == ["arc_easy", "winogrande", "hellaswag",
                                                                  "arc_challenge", "mmlu", "demo_ppl_a"]
    assert shots("hellaswag", {}) == 10 and shots("hellaswag", {"hellaswag": 0}) == 0 and shots("x", {}) == 0


def test_reduce_results_keeps_requested_tasks_and_drops_na():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "word_perplexity,none":
                                 "N/A", "acc,strict": 0.25}, "other": {"acc,none": 1.0}},
               "groups": {"g": {"acc,none": 0.75, "acc_stderr,none": "N/A"}},
               "n-samples": {"t": {"original": 9, "effective": 8}}}
    assert reduce_results(results, ["t", "g"]) == {"t": {"acc": 0.5, "acc_stderr": 0.1, "acc_strict": 0.25,
                                                          "samples": 8},
                                                    "g": {"acc": 0.75}}


# ---------------------------------------------------------------- lm-eval on an in-memory model, offline
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny dense Qwen3 with a BPE tokenizer trained here, plus generated demo tasks."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from moe2dense.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiny_lm")
    docs = _docs(n_per_domain=5, words=80)
    tok = train_bpe(docs["text"].to_list(), vocab_size=300, min_frequency=1, out_dir=root / "tok")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    docs.write_parquet(root / "eval.parquet")
    tasks = root / "tasks"
    tasks.mkdir()
    build_demo_tasks(root / "eval.parquet", tasks, ContinuationParams(items_per_domain=4, distractors=3,
                                                                      context_chars=80, continuation_words=4), 0)
    return model, tok, tasks


def _plain_loglik(model, ids: list[int]) -> float:
    with torch.inference_mode():
        logp = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    return float(logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum())


def test_lm_eval_offline_matches_a_plain_forward(tiny_lm, no_network):
    from moe2dense.evaluate.runner import evaluate_model

    model, tok, tasks_dir = tiny_lm
    p = EvaluateParams(tasks=["demo"], batch_size=4, max_length=256, device="cpu")
    tasks = load_tasks(p, tasks_dir)
    try:
        assert tasks.names == ["demo_continuation", "demo_ppl_code", "demo_ppl_prose"]
        result = evaluate_model(model, tok, tasks, p)
    finally:
        tasks.close()
    assert result["size"] == {"parameters": sum(x.numel() for x in model.parameters()),
                              "weight_bytes": 4 * sum(x.numel() for x in model.parameters()),
                              "dtype": "float32", "model_type": "qwen3"}
    # Perplexity: every document fits one window, scored after the prefix (EOS) token.
    for domain in ("code", "prose"):
        texts = [json.loads(line)["text"] for line in (tasks_dir / f"demo_ppl_{domain}.jsonl").open()]
        ll = sum(_plain_loglik(model, [tok.eos_token_id] + tok(t)["input_ids"]) for t in texts)
        nbytes = sum(len(t.encode()) for t in texts)
        got = result[f"demo_ppl_{domain}"]
        assert got["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-4)
        assert got["samples"] == 5
    # Multiple choice: acc is the share of items whose true continuation has the highest log-likelihood.
    items = [json.loads(line) for line in (tasks_dir / "demo_continuation.jsonl").open()]
    hits = []
    for item in items:
        ctx = tok(item["context"])["input_ids"]
        # lm-eval splits the pair as encode(context + choice)[len(encode(context)):] (choices carry their space)
        scores = [_continuation_ll(model, ctx, tok(item["context"] + c)["input_ids"][len(ctx):])
                  for c in item["choices"]]
        hits.append(int(np.argmax(scores) == item["label"]))
    mc = result["demo_continuation"]
    assert mc["samples"] == len(items) == 8
    assert mc["acc"] == pytest.approx(np.mean(hits), abs=1e-6)
    assert {"acc_stderr", "acc_norm", "acc_mutual_info"} <= set(mc)


def _continuation_ll(model, ctx: list[int], cont: list[int]) -> float:
    ids = ctx + cont
    with torch.inference_mode():
        logp = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    return float(logp[len(ctx) - 1:-1].gather(-1, torch.tensor(cont)[:, None]).sum())


def test_results_are_deterministic(tiny_lm, no_network):
    from moe2dense.evaluate.runner import evaluate_model

    model, tok, tasks_dir = tiny_lm
    p = EvaluateParams(tasks=["demo_ppl_prose"], batch_size=2, max_length=32, device="cpu")
    runs = []
    for _ in range(2):
        tasks = load_tasks(p, tasks_dir)
        try:
            runs.append(evaluate_model(model, tok, tasks, p))
        finally:
            tasks.close()
    assert runs[0] == runs[1] and list(runs[0]) == ["size", "demo_ppl_prose"]


def test_unknown_task_and_stray_shots_are_named(tiny_lm):
    _, _, tasks_dir = tiny_lm
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['no_such_task'\].*demo_continuation"):
        load_tasks(EvaluateParams(tasks=["demo", "no_such_task"]), tasks_dir)
    with pytest.raises(ValueError, match=r"num_fewshot names \['arc_easy'\]"):
        load_tasks(EvaluateParams(tasks=["demo"], num_fewshot={"arc_easy": 3}), tasks_dir)


def test_paper_task_without_cached_dataset_fails_with_instructions(tiny_lm, no_network, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    _, _, tasks_dir = tiny_lm
    with pytest.raises(ValueError) as err:
        load_tasks(EvaluateParams(tasks=["arc_easy"]), tasks_dir)
    msg = str(err.value)
    assert "'arc_easy'" in msg and "allenai/ai2_arc" in msg and "offline" in msg and "HF_DATASETS_CACHE" in msg


def test_missing_inputs_are_named(tmp_path):
    from moe2dense.evaluate.runner import load_model

    with pytest.raises(FileNotFoundError, match="eval_tasks"):
        load_tasks(EvaluateParams(), tmp_path / "eval_tasks")
    with pytest.raises(FileNotFoundError, match="models/distilled holds no model"):
        load_model(tmp_path / "models/distilled", EvaluateParams())


def test_evaluate_stage_keeps_wall_time_out_of_its_output(tiny_lm, tmp_path):
    """`python -m stages.evaluate teacher` from another directory: eval/teacher.json holds only results (so a rerun
    is byte-identical) and the wall time goes to the untracked timings/evaluate_teacher.json."""
    model, tok, tasks_dir = tiny_lm
    model.save_pretrained(tmp_path / "models/teacher")
    tok.save_pretrained(tmp_path / "models/teacher")
    shutil.copytree(tasks_dir, tmp_path / "eval_tasks")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(tasks=["demo_ppl_prose"], device="cpu", max_length=64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # offline: conftest set OFFLINE_ENV
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "teacher"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval/teacher.json").read_text())
    assert list(result) == ["demo_ppl_prose", "path", "size"] and result["demo_ppl_prose"]["samples"] == 5
    timings = json.loads((tmp_path / "timings/evaluate_teacher.json").read_text())
    assert list(timings) == ["seconds"] and timings["seconds"] > 0
