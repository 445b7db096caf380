"""The design-space screen's grid, K rules and content keys (the end-to-end screen runs in test_pipeline.py)."""

from __future__ import annotations

import pytest

from moe2dense.io import digest_paths
from moe2dense.screen import PURE, Config, cache_key, check_experts, configurations, default_experts


def test_default_experts_double_from_k_to_E():
    assert default_experts(4, 32) == [4, 8, 16, 32]
    assert default_experts(2, 60) == [2, 4, 8, 16, 32, 60]
    assert default_experts(8, 8) == [8]


def test_grid_counts_pure_pruning_once_per_scoring_and_scaling():
    grid = configurations(["sf", "do_acp"], ["weight", "output", "router"], ["uniform", "score"], [4, 8, 16], k=4)
    # K == k: 2 methods x 2 scalings; K in {8, 16}: 2 x 3 x 2 x 2
    assert len(grid) == 2 * 2 + 2 * 3 * 2 * 2
    assert {c.grouping for c in grid if c.experts == 4} == {PURE}
    assert grid == sorted(grid) and len(set(grid)) == len(grid)
    assert Config("sf", 8, "weight", "score").name == "sf-K8-weight-score"


def test_impossible_k_is_named_with_the_range():
    check_experts([4, 32], 4, 32)
    with pytest.raises(ValueError, match=r"screen.experts \[2, 64\] out of range.*4 <= K <= 32"):
        check_experts([2, 8, 64], 4, 32)


def test_cache_key_changes_with_config_inputs_and_settings(tmp_path):
    cfg = Config("sf", 8, "weight", "score")
    base = cache_key(cfg, "abc", {"rows": 8})
    assert base == cache_key(Config("sf", 8, "weight", "score"), "abc", {"rows": 8})
    assert len({base, cache_key(cfg, "abd", {"rows": 8}), cache_key(cfg, "abc", {"rows": 16}),
                cache_key(Config("sf", 8, "weight", "uniform"), "abc", {"rows": 8})}) == 4
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"1")
    first = digest_paths([tmp_path / "d"])
    (tmp_path / "d" / "a.bin").write_bytes(b"2")
    assert digest_paths([tmp_path / "d"]) != first


def test_unknown_method_in_the_grid_is_a_params_error():
    from moe2dense.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match=r"screen.methods\[1\]"):
        parse_params({"screen": {"methods": ["sf", "magic"]}}, "params.yaml")
    with pytest.raises(ParamsError, match="screen.experts"):
        parse_params({"screen": {"experts": [0, 4]}}, "params.yaml")


def test_results_table_has_no_wall_clock_and_timings_hold_the_computed_ones():
    from moe2dense.screen import results_table, timings

    def result(name: str, ppl: float, total: float) -> dict:
        return {"config": name, "method": "sf", "experts": 8, "grouping": "output", "scaling": "uniform",
                "perplexity": ppl, "seconds": {"select_plan": 0.1, "assemble": 0.2, "evaluate": 0.3, "total": total}}

    results = [result("b", 9.0, 1.5), result("a", 7.0, 2.0)]
    table = results_table(results)
    assert table["config"].to_list() == ["a", "b"] and not [c for c in table.columns if "second" in c]
    # the same results with other run times give the same table: the DVC output depends on the inputs only
    assert table.equals(results_table([result("b", 9.0, 4.0), result("a", 7.0, 0.5)]))
    # a result read back from the cache (JSON, sorted keys) gives the same columns in the same order
    cached = [dict(sorted(r.items())) for r in results]
    assert results_table(cached).columns == table.columns and results_table(cached).equals(table)
    t = timings(results, computed=["b"])
    assert t == {"computed": 1, "cached": 1, "seconds_total": 1.5, "configurations": {"b": results[0]["seconds"]}}


def test_results_markdown_pins_both_tables():
    from moe2dense.screen import results_markdown, results_table

    def result(method: str, K: int, grouping: str, ppl: float) -> dict:
        return {"config": Config(method, K, grouping, "uniform").name, "method": method, "experts": K,
                "grouping": grouping, "scaling": "uniform", "perplexity": ppl, "routed_mass_kept": K / 32}

    table = results_table([result("sf", 4, PURE, 300.04), result("sf", 8, "router", 25012.5),
                           result("reap", 4, PURE, 238.21)])  # reap has no K=8 configuration: a dash
    assert results_markdown(table, best=2) == """\
# Design-space screen: 3 configurations

Held-out perplexity of the assembled student, before distillation; lower is better.

## Best 2

| config | method | experts | grouping | scaling | perplexity | routed_mass_kept |
|---|---|---|---|---|---|---|
| reap-K4-none-uniform | reap | 4 | none | uniform | 238.2 | 0.125 |
| sf-K4-none-uniform | sf | 4 | none | uniform | 300 | 0.125 |

## Best per scoring method and K

| method | K=4 | K=8 |
|---|---|---|
| reap | 238.2 (none, uniform) | — |
| sf | 300 (none, uniform) | 2.501e+04 (router, uniform) |
"""
    capped = results_markdown(table, best=10)  # best capped at the configurations there are
    assert "## Best 3\n" in capped
    assert "| sf-K8-router-uniform | sf | 8 | router | uniform | 2.501e+04 | 0.25 |\n" in capped
