"""Calibration capture agrees with the model: routing rows and every LayerStats sum against a brute-force
recomputation on each family's tiny model; expensive passes run only when asked; memory does not grow with the
number of tokens; hooks never outlive a capture."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import CONFIGS, tiny_model

from moe2dense.arch import Adapter, get_adapter
from moe2dense.calibrate.capture import _WriterThreads, calibration_batches, capture
from moe2dense.calibrate.store import read_meta, read_stats, routing_path
from moe2dense.data.packing import PackedWriter

ALL = {"routing", "routed_outputs", "all_outputs"}
REPO = Path(__file__).resolve().parents[1]


def make_batches(vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, list[str]]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (3, 12), generator=g), ["web", "code", "web"]),
            (torch.randint(0, vocab, (2, 12), generator=g), ["math", "math"])]


def record_router(model, adapter: Adapter) -> tuple[dict[int, list], list]:
    """Hook every MoE router: per layer, the (x, logits, weights, index) of each call, as the model computed them."""
    seen = {layer: [] for layer in adapter.moe_layers}

    def hook(layer):
        def fn(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).detach().clone()
            seen[layer].append((x, *(t.detach().clone() for t in adapter.router_output(out))))
        return fn

    handles = [adapter.router_module(model, layer).register_forward_hook(hook(layer)) for layer in adapter.moe_layers]
    return seen, handles


def scores(adapter: Adapter, logits: torch.Tensor) -> torch.Tensor:
    """p_t: sigmoid or softmax over all experts, as the family's RouterSpec says (README "Scoring methods");
    gemma4_text's router outputs p_t itself."""
    if adapter.spec.router.returns_probs:
        return logits
    return logits.sigmoid() if adapter.spec.router.score == "sigmoid" else logits.softmax(-1)


def by_expert_id(index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each token's selection by expert id (deepseek's router returns its top-k unsorted)."""
    index, order = index.sort(-1)
    return index, weights.gather(-1, order)


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    """Capture every pass of one family's tiny model, with the model's own routing recorded alongside."""
    name = request.param
    model = tiny_model(name)
    adapter = get_adapter(model)
    batches = make_batches(model.config.vocab_size)
    root = tmp_path_factory.mktemp(name)
    seen, handles = record_router(model, adapter)
    try:
        stats = capture(model, batches, root, needs=ALL, store_probs=True, token_chunk=7, progress=False)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():  # the model's own router logits, from the output API rather than a hook
        logits = [model(b[0], output_router_logits=True).router_logits for b in batches]
    logits = {layer: torch.cat([out[i] for out in logits]).float() for i, layer in enumerate(adapter.moe_layers)}
    return model, adapter, batches, root, stats, seen, logits


def test_routing_rows_equal_model_routing(family):
    model, adapter, batches, root, stats, seen, logits = family
    domains = [d for _, ds in batches for d in ds for _ in range(12)]
    for layer in adapter.moe_layers:
        rows = pq.read_table(routing_path(root, layer)).to_pydict()
        want_i = torch.cat([call[3] for call in seen[layer]])
        want_w = torch.cat([call[2] for call in seen[layer]]).float()
        got_i = torch.tensor(rows["experts"], dtype=torch.long)
        got_w = torch.tensor(rows["weights"])
        want_i, want_w = by_expert_id(want_i, want_w)
        got_i, got_w = by_expert_id(got_i, got_w)
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
        assert rows["seq"] == np.repeat(np.arange(5), 12).tolist() and rows["pos"] == list(range(12)) * 5
        assert rows["domain"] == domains
        torch.testing.assert_close(torch.tensor(rows["probs"]), scores(adapter, logits[layer]), atol=1e-3,
                                   rtol=1e-3)  # stored as float16
        # Also equal to the adapter's independent re-routing of the router's input (guards the output convention).
        x = torch.cat([call[0] for call in seen[layer]])
        r = adapter.route(model, layer, adapter.router_logits(model, layer, x))
        re_i, re_w = by_expert_id(r.index, r.weights)
        assert torch.equal(got_i, re_i)
        torch.testing.assert_close(got_w, re_w, atol=1e-5, rtol=1e-5)


def test_routing_stats_equal_model_routing(family):
    model, adapter, batches, root, stats, seen, logits = family
    assert stats.keys() == read_stats(root).keys() == set(adapter.moe_layers)
    meta = read_meta(root)
    assert (meta["n_tokens"], meta["n_sequences"], meta["domains"]) == (60, 5, {"code": 12, "math": 24, "web": 24})
    assert (meta["model_type"], meta["moe_layers"], meta["needs"]) == (adapter.model_type, adapter.moe_layers,
                                                                       ["routing", "routed_outputs", "all_outputs"])
    for layer, s in read_stats(root).items():
        index = torch.cat([call[3] for call in seen[layer]]).long()
        weights = torch.cat([call[2] for call in seen[layer]]).double()
        p = scores(adapter, logits[layer].double())
        E = adapter.num_experts
        assert s.n_tokens == 60 and torch.equal(s.count, torch.bincount(index.reshape(-1), minlength=E).double())
        close = dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.prob_sum, p.sum(0), **close)
        torch.testing.assert_close(s.prob_sum_selected, torch.zeros(E, dtype=torch.float64).index_add_(
            0, index.reshape(-1), p.gather(1, index).reshape(-1)), **close)
        torch.testing.assert_close(s.weight_sum, torch.zeros(E, dtype=torch.float64).index_add_(
            0, index.reshape(-1), weights.reshape(-1)), **close)
        stored = torch.tensor(pq.read_table(routing_path(root, layer))["probs"].to_pylist(), dtype=torch.float64)
        torch.testing.assert_close(s.prob_sum, stored.sum(0), atol=0.05, rtol=1e-3)  # float16 per token


def brute_force(model, adapter: Adapter, layer: int, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
    """The output-based sums from one f_e call per expert, float64 reductions."""
    with torch.no_grad():
        f = torch.stack([adapter.expert_forward(adapter.expert_weights(model, layer, e), x)
                         for e in range(adapter.num_experts)]).double()  # [E, T, H]
    norms = f.norm(dim=-1)  # [E, T]
    routed = norms.T.gather(1, index)  # [T, k]
    E = adapter.num_experts
    add = lambda v: torch.zeros(E, dtype=torch.float64).index_add_(0, index.reshape(-1), v.reshape(-1))  # noqa: E731
    return dict(norm_sum_routed=add(routed), gnorm_sum_routed=add(weights * routed), norm_sum_all=norms.sum(1),
                sqnorm_sum_all=norms.square().sum(1), gram=torch.einsum("ith,jth->ij", f, f))


def test_output_stats_equal_brute_force(family, tmp_path):
    model, adapter, batches, root, stats, seen, _ = family
    routed_only = capture(model, batches, tmp_path, needs={"routed_outputs"}, progress=False)  # per-expert path
    for layer, s in read_stats(root).items():
        with torch.no_grad():  # the experts' input (test_arch checks it is what the model's experts see)
            x = adapter.expert_input(model, layer, torch.cat([call[0] for call in seen[layer]]))
        index = torch.cat([call[3] for call in seen[layer]]).long()
        weights = torch.cat([call[2] for call in seen[layer]]).double()
        want = brute_force(model, adapter, layer, x, index, weights)
        for name, value in want.items():
            torch.testing.assert_close(getattr(s, name), value, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(s.gram.diagonal(), s.sqnorm_sum_all, rtol=1e-5, atol=1e-6)
        for name in ("norm_sum_routed", "gnorm_sum_routed"):  # routed-only pass == read off the all-experts pass
            torch.testing.assert_close(getattr(routed_only[layer], name), want[name], rtol=1e-4, atol=1e-6, msg=name)
        assert routed_only[layer].gram is None and routed_only[layer].norm_sum_all is None


@pytest.fixture
def spy(monkeypatch):
    """Count calls of the all-experts function and of the per-expert function, recording block sizes."""
    calls = {"all": [], "expert": 0}
    all_outputs, expert_forward = Adapter.all_expert_outputs, Adapter.expert_forward

    def all_spy(self, model, layer, x, experts=None):
        calls["all"].append(x.shape[0])
        return all_outputs(self, model, layer, x, experts)

    def expert_spy(w, x):
        calls["expert"] += 1
        return expert_forward(w, x)

    monkeypatch.setattr(Adapter, "all_expert_outputs", all_spy)
    monkeypatch.setattr(Adapter, "expert_forward", staticmethod(expert_spy))
    return calls


@pytest.mark.parametrize("needs", [{"routing"}, {"routing", "routed_outputs"}, ALL])
def test_expert_passes_run_only_when_needed(needs, spy, tmp_path):
    model = tiny_model("qwen3_moe")
    stats = capture(model, make_batches(64), tmp_path, needs=needs, token_chunk=5, progress=False)
    n_layers = len(stats)
    if "all_outputs" in needs:  # blocks of <= token_chunk tokens, per batch (36, 24 tokens) and layer
        assert spy["all"] == ([5] * 7 + [1]) * n_layers + ([5] * 4 + [4]) * n_layers
        assert spy["expert"] == 0  # routed norms come from the same block, not recomputed
    else:
        assert spy["all"] == []
    assert (spy["expert"] > 0) == (needs == {"routing", "routed_outputs"})
    for s in read_stats(tmp_path).values():
        assert (s.norm_sum_routed is not None) == ("routed_outputs" in needs)
        assert all((getattr(s, f) is not None) == ("all_outputs" in needs)
                   for f in ("norm_sum_all", "sqnorm_sum_all", "gram"))
    assert read_meta(tmp_path)["needs"] == [c for c in ("routing", "routed_outputs", "all_outputs") if c in needs]


def test_rejects_unknown_pass(tmp_path):
    with pytest.raises(ValueError, match="unknown capture pass"):
        capture(tiny_model("qwen3_moe"), make_batches(64), tmp_path, needs={"all_experts"}, progress=False)


def router_hooks(model) -> list[int]:
    ad = get_adapter(model)
    return [len(ad.router_module(model, layer)._forward_hooks) for layer in ad.moe_layers]


def test_hooks_removed_after_capture_and_on_error(tmp_path):
    model = tiny_model("qwen3_moe")
    arrow_pool = pa.default_memory_pool().backend_name
    capture(model, make_batches(64), tmp_path / "ok", needs=ALL, progress=False)
    assert router_hooks(model) == [0, 0] and not model.training
    assert pa.default_memory_pool().backend_name == arrow_pool  # capture's allocator switch is undone

    def boom(module, args, out):
        raise RuntimeError("forward failed")

    model.train()
    failing = model.model.layers[-1].register_forward_hook(boom)  # raises after the routers' hooks have fired
    with pytest.raises(RuntimeError, match="forward failed"):
        capture(model, make_batches(64), tmp_path / "fail", needs=ALL, progress=False)
    failing.remove()
    assert router_hooks(model) == [0, 0] and model.training  # mode restored too
    assert pa.default_memory_pool().backend_name == arrow_pool
    assert not list((tmp_path / "fail").rglob("*.parquet")) and not list((tmp_path / "fail").rglob("*.tmp"))

    bad_batch = [(torch.full((1, 4), 10_000), ["web"])]  # out-of-vocabulary id: the embedding raises
    with pytest.raises(IndexError):
        capture(model, bad_batch, tmp_path / "bad", needs={"routing"}, progress=False)
    assert router_hooks(model) == [0, 0]
    assert not list((tmp_path / "ok").rglob("*.tmp"))


def test_calibration_batches_caps_tokens_at_whole_sequences(tmp_path):
    path = tmp_path / "calib.parquet"
    w = PackedWriter(path, seq_len=8, sep_id=2, row_group_rows=4)  # batches of 3 rows straddle the 4-row groups
    for i in range(10):
        w.add("web" if i % 2 else "code", range(3 + i, 10 + i))  # 7 ids + separator: one row each
    assert w.close() == 10
    table = pq.read_table(path)
    rows = np.asarray(table["input_ids"].to_pylist(), dtype=np.int64)
    domains = table["domain"].to_pylist()
    full = list(calibration_batches(path, batch_rows=3))
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in full]), rows)
    assert [d for _, ds in full for d in ds] == domains
    capped = list(calibration_batches(path, batch_rows=3, max_tokens=60))  # 7.5 rows -> 7 whole rows
    assert sum(ids.shape[0] for ids, _ in capped) == 7 and all(ids.dtype == np.int64 for ids, _ in capped)
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in capped]), rows[:7])
    assert [d for _, ds in capped for d in ds] == domains[:7]


# The child measures its own peak RSS *during* capture: it warms up (one small capture: lazy imports, allocator
# pools), resets the kernel's high-water mark (/proc/self/clear_refs "5") and reads VmHWM afterwards. Plain
# ru_maxrss cannot be used: a process started from pytest inherits the parent's high-water mark at exec (a child of
# a 1.6 GB parent reports ru_maxrss ~1.55 GB before allocating anything), which would hide any growth. It writes
# inline (writer_threads=0): the rows take the same path, but background writers make the peak depend on how their
# transient buffers coincide with the forward's (+-5 MB between identical runs, vs +-1 MB inline); the writer
# queue's own bound is tested in test_writer_threads_bound_the_queue_and_keep_order.
MEMORY_CHILD = textwrap.dedent("""
    import json, re, sys, tempfile
    import pyarrow.parquet as pq, torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    from moe2dense.calibrate.capture import capture
    from moe2dense.calibrate.store import routing_path

    n_tokens, E, R, ROWS, SEQ = int(sys.argv[1]), 128, 1024, 4, 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        intermediate_size=32, moe_intermediate_size=8, num_experts=E, num_experts_per_tok=2)).eval()

    def batches(n):
        g = torch.Generator().manual_seed(1)
        for _ in range(n // (ROWS * SEQ)):
            yield torch.randint(0, 64, (ROWS, SEQ), generator=g), ["web", "code"] * (ROWS // 2)

    def run(n, root):
        capture(model, batches(n), root, needs={"routing", "routed_outputs", "all_outputs"}, store_probs=True,
                row_group_rows=R, token_chunk=512, progress=False, writer_threads=0)

    def mb(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    with tempfile.TemporaryDirectory() as d:
        run(4 * R, d)
    open("/proc/self/clear_refs", "w").write("5")
    base = mb("VmRSS")
    with tempfile.TemporaryDirectory() as d:
        run(n_tokens, d)
        md = pq.ParquetFile(routing_path(d, 0)).metadata
        groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    print(json.dumps({"growth_mb": mb("VmHWM") - base, "groups": groups}))
""")


def test_writer_threads_bound_the_queue_and_keep_order():
    threads = _WriterThreads(2, max_pending=3)
    seen: dict[int, list[int]] = {0: [], 1: []}
    peak = 0
    for i in range(20):
        threads.submit(i % 2, lambda w, j: (time.sleep(0.001), seen[w].append(j)), i % 2, i)
        peak = max(peak, len(threads._pending))
    threads.join()
    assert peak <= 3 and seen == {0: list(range(0, 20, 2)), 1: list(range(1, 20, 2))}

    def fail():
        raise OSError("disk full")

    threads = _WriterThreads(1, max_pending=2)
    threads.submit(0, fail)
    with pytest.raises(OSError, match="disk full"):
        threads.join()


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_memory_does_not_grow_with_calibration_tokens():
    N = 32768
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs: dict[int, list[dict]] = {N: [], 2 * N: []}
    for _ in range(2):  # allocator noise only ever adds (up to ~6 MB seen on a busy machine): the least of two runs
        procs = {n: subprocess.Popen([sys.executable, "-c", MEMORY_CHILD, str(n)], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in runs}
        for n, p in procs.items():  # both sizes run at once (one thread each): memory is per process
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            runs[n].append(json.loads(out.strip().splitlines()[-1]))
    one, two = (min(runs[n], key=lambda r: r["growth_mb"]) for n in (N, 2 * N))
    # Routing rows alone (float16 probs over E=128 experts + ids/weights/seq/pos, 2 layers) are ~550 B per token,
    # so holding the extra N tokens' rows in RAM would add ~18 MB. The least of two runs of this child differs by a
    # few MB, so half the leak (9 MB) separates "bounded" from "grows per token" with a wide margin on both sides.
    leak_mb = N * 2 * (128 * 2 + 2 * (2 + 4) + 8) / 2**20
    assert two["growth_mb"] <= one["growth_mb"] + leak_mb / 2, (one, two)
    # Row groups keep flushing as tokens stream in: twice the tokens, twice the groups, none above row_group_rows.
    assert len(two["groups"]) == 2 * len(one["groups"]) == 64
    assert max(one["groups"] + two["groups"]) == 1024
