"""Each figure renders a readable, deterministic PNG from tiny hand-made inputs, and a 48-layer x 128-expert
selection heatmap stays fast and legible (tall, two panels per row) rather than one unreadable strip."""
from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest
from PIL import Image

from moe2dense.plots import DPI, plot_score_distributions, plot_selection_heatmap, plot_usage_by_domain

METHODS = ("sf", "cp", "acp", "do_acp")


def selection(layers: int, experts: int, K: int, seed: int = 0) -> dict[str, dict[int, list[int]]]:
    rng = np.random.default_rng(seed)
    return {m: {layer: sorted(rng.choice(experts, K, replace=False).tolist()) for layer in range(layers)}
            for m in METHODS}


def scores(layers: int, experts: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    scale = {"sf": 1.0, "cp": 0.3, "acp": 50.0, "do_acp": -3.0}  # different scales and signs, as real methods
    rows = [(layer, e, m, float(scale[m] * v)) for m in METHODS for layer in range(layers)
            for e, v in enumerate(rng.gamma(0.7, size=experts))]
    return pl.DataFrame(rows, schema={"layer": pl.Int32, "expert": pl.Int32, "method": pl.String,
                                      "score": pl.Float64}, orient="row")


def usage(layers: int, experts: int, domains=("bible", "python_code", "python_docs"), seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        for d in domains:
            count = rng.poisson(rng.gamma(0.5, size=experts) * 50)
            rows += [(layer, d, e, int(c), c / count.sum()) for e, c in enumerate(count) if c > 0]  # zeros absent
    return pl.DataFrame(rows, schema={"layer": pl.Int32, "domain": pl.String, "expert": pl.Int32,
                                      "count": pl.Int64, "share": pl.Float64}, orient="row")


def read_png(path, min_kb: float = 10) -> np.ndarray:
    assert path.exists() and path.stat().st_size > min_kb * 1024, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_selection_heatmap_small(tmp_path):
    sel = selection(layers=4, experts=8, K=3)
    sel["sf"][0] = [0, 1, 2]
    img = read_png(plot_selection_heatmap(sel, 8, tmp_path / "sel.png"))
    h, w, _ = img.shape
    assert w > h  # four short panels side by side
    assert (np.abs(img.astype(int) - [0x1F, 0x5F, 0xA8]).sum(-1) < 10).any()  # the "kept" colour is drawn


def test_selection_heatmap_48_layers_128_experts_is_fast_and_tall(tmp_path):
    start = time.perf_counter()
    path = plot_selection_heatmap(selection(layers=48, experts=128, K=8), 128, tmp_path / "big.png")
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"{elapsed:.1f} s"  # ~1.5 s on 2 cores; per-cell artists would take minutes
    h, w, _ = read_png(path, min_kb=50).shape
    # Four panels wrap into two rows within ~18 inches, each tall enough for 48 layer rows (>= 6 inches).
    assert w <= 18.5 * DPI and h >= 2 * 6 * DPI


def test_rendering_is_deterministic(tmp_path):
    sel = selection(layers=3, experts=16, K=4)
    a = plot_selection_heatmap(sel, 16, tmp_path / "a.png").read_bytes()
    b = plot_selection_heatmap(sel, 16, tmp_path / "b.png").read_bytes()
    assert a == b


def test_score_distributions(tmp_path):
    img = read_png(plot_score_distributions(scores(layers=6, experts=16), tmp_path / "nested" / "scores.png"))
    h, w, _ = img.shape
    assert 1.0 < w / h < 3.0  # a 2 x 3 grid of panels plus the layer colour bar


def test_usage_by_domain(tmp_path):
    img = read_png(plot_usage_by_domain(usage(layers=4, experts=32), tmp_path / "usage.png"))
    h, w, _ = img.shape
    assert w > 2 * h  # four layers side by side, three domain rows each
    big = read_png(plot_usage_by_domain(usage(layers=24, experts=128), tmp_path / "usage_big.png"), min_kb=50)
    h, w, _ = big.shape
    assert w <= 18.5 * DPI and h >= 12 * 0.8 * DPI  # 24 layers wrap into 12 rows of >= 0.8-inch panels


@pytest.mark.parametrize("plot, empty", [
    (plot_selection_heatmap, {}),
    (plot_score_distributions, pl.DataFrame(schema={"layer": pl.Int32, "expert": pl.Int32, "method": pl.String,
                                                    "score": pl.Float64})),
    (plot_usage_by_domain, pl.DataFrame(schema={"layer": pl.Int32, "domain": pl.String, "expert": pl.Int32,
                                                "count": pl.Int64, "share": pl.Float64})),
])
def test_empty_input_is_an_error(plot, empty, tmp_path):
    with pytest.raises(ValueError, match="no "):
        plot(empty, 8, tmp_path / "x.png") if plot is plot_selection_heatmap else plot(empty, tmp_path / "x.png")
