"""Calibration Parquet layout: stats round trip, bounded row groups, hive layer key, usage counts, atomic writes."""
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from moe2dense.calibrate.store import (
    RoutingWriter, read_meta, read_stats, routing_path, scan_routing, stats_path, usage_by_domain, write_meta,
    write_stats,
)
from moe2dense.scoring import LayerStats


def random_stats(E=5, full=True, seed=0) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    v = lambda: torch.rand(E, generator=g, dtype=torch.float64)  # noqa: E731
    A = torch.randn(E, 3, generator=g, dtype=torch.float64)
    extra = dict(norm_sum_routed=v(), gnorm_sum_routed=v(), norm_sum_all=v(), sqnorm_sum_all=v(), gram=A @ A.T)
    return LayerStats(n_tokens=1000 + seed, top_k=2, count=v(), prob_sum=v(), prob_sum_selected=v(),
                      weight_sum=v(), **(extra if full else {}))


def test_stats_round_trip(tmp_path):
    written = {10: random_stats(seed=1), 2: random_stats(full=False, seed=2)}
    for layer, s in written.items():
        write_stats(tmp_path, layer, s)
    read = read_stats(tmp_path)
    assert list(read) == [2, 10]  # numeric layer order, not "10" < "2"
    for layer, s in written.items():
        r = read[layer]
        assert (r.n_tokens, r.top_k) == (s.n_tokens, s.top_k)
        for name, want in vars(s).items():
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(getattr(r, name), want, rtol=0, atol=0)
            else:
                assert getattr(r, name) == want, name
    assert read[2].gram is None and read[2].sqnorm_sum_all is None
    schema = pq.ParquetFile(stats_path(tmp_path, 10)).schema_arrow
    assert "layer" not in schema.names and str(schema.field("gram").type) == "fixed_size_list<element: double>[5]"


def append_batches(w: RoutingWriter, n_batches: int, n: int, E: int, k: int, rng) -> list[np.ndarray]:
    probs = []
    for b in range(n_batches):
        p = rng.random((n, E)).astype(np.float32)
        experts = np.argsort(-p, axis=1)[:, :k]
        w.append(np.full(n, b), np.arange(n), rng.choice(["web", "code"], n), torch.from_numpy(experts),
                 np.take_along_axis(p, experts, 1), torch.from_numpy(p))
        probs.append(p)
    return probs


def test_routing_writer_bounded_row_groups_and_polars_reads_float16(tmp_path):
    E, k, R = 6, 2, 100
    with RoutingWriter(tmp_path, 0, top_k=k, num_experts=E, store_probs=True, row_group_rows=R) as w:
        probs = append_batches(w, 3, 37, E, k, np.random.default_rng(0))
        assert w.rows_written == 100  # a full group is flushed as soon as it fills: the buffer stays < R + batch
        probs += append_batches(w, 7, 37, E, k, np.random.default_rng(1))
    meta = pq.ParquetFile(routing_path(tmp_path, 0)).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert meta.num_row_groups == 4 and sizes == [100, 100, 100, 70] and max(sizes) <= R

    df = pl.read_parquet(routing_path(tmp_path, 0))
    assert df.schema["probs"] == pl.Array(pl.Float16, E) and df.schema["experts"] == pl.Array(pl.Int16, k)
    assert df.height == 370 and set(df["domain"].cast(pl.String)) == {"web", "code"}
    np.testing.assert_array_equal(df["probs"].to_numpy().astype(np.float32),
                                  np.concatenate(probs).astype(np.float16).astype(np.float32))


def test_routing_writer_validates_inputs(tmp_path):
    with RoutingWriter(tmp_path, 0, top_k=2, num_experts=4) as w:
        with pytest.raises(ValueError, match="probs must be given iff store_probs"):
            w.append([0], [0], "a", [[0, 1]], [[0.5, 0.5]], probs=[[0.25] * 4])
        with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
            w.append([0], [0], "a", [[0, 4]], [[0.5, 0.5]])


def write_usage_example(root):
    with RoutingWriter(root, 0, top_k=2, num_experts=3) as w:
        w.append([0, 0, 1], [0, 1, 0], ["a", "a", "b"], [[0, 1], [0, 2], [1, 2]], np.full((3, 2), 0.5))
    with RoutingWriter(root, 3, top_k=2, num_experts=3) as w:
        w.append([0], [0], "b", [[2, 0]], [[0.7, 0.3]])


def test_scan_routing_adds_hive_layer_not_in_file(tmp_path):
    write_usage_example(tmp_path)
    df = scan_routing(tmp_path).collect()
    assert df.schema["layer"] == pl.Int32 and df["layer"].to_list() == [0, 0, 0, 3]
    assert "layer" not in pq.ParquetFile(routing_path(tmp_path, 3)).schema_arrow.names


def test_usage_by_domain_hand_example(tmp_path):
    write_usage_example(tmp_path)
    # layer 0: a -> {0,1}, {0,2}: e0 2, e1 1, e2 1 of 4 selections;  b -> {1,2}: e1 1, e2 1 of 2
    # layer 3: b -> {2,0}: e0 1, e2 1 of 2
    expected = pl.DataFrame({
        "layer": [0, 0, 0, 0, 0, 3, 3], "domain": ["a", "a", "a", "b", "b", "b", "b"],
        "expert": [0, 1, 2, 1, 2, 0, 2], "count": [2, 1, 1, 1, 1, 1, 1],
        "share": [0.5, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5],
    }, schema={"layer": pl.Int32, "domain": pl.String, "expert": pl.Int32, "count": pl.Int64, "share": pl.Float64})
    assert usage_by_domain(tmp_path).equals(expected)


def test_writes_are_atomic(tmp_path):
    write_usage_example(tmp_path)
    write_stats(tmp_path, 0, random_stats())
    write_meta(tmp_path, {"model": "demo", "layers": [0, 3]})
    with pytest.raises(RuntimeError):  # a failed capture publishes nothing
        with RoutingWriter(tmp_path, 7, top_k=2, num_experts=3) as w:
            w.append([0], [0], "a", [[0, 1]], [[0.5, 0.5]])
            raise RuntimeError("capture failed")
    assert not list(tmp_path.rglob("*.tmp"))
    assert not routing_path(tmp_path, 7).exists()
    assert read_meta(tmp_path) == {"layers": [0, 3], "model": "demo"}
    text = (tmp_path / "meta.json").read_text()
    assert text.index('"layers"') < text.index('"model"')  # sorted keys: byte-stable for DVC hashing
