"""Figures of a conversion run (PNG, 120 dpi): which experts each scoring method keeps, how the methods' scores are
distributed, and how each corpus domain uses the experts.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot: no global backend or figure state) and
saved without a software-version stamp, so the same inputs give the same bytes. Sizes scale with the number of
layers and experts; with many experts the per-expert tick labels give way to a few evenly spaced ones.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 120
MAX_WIDTH_IN = 18.0  # panels wrap into more rows rather than grow wider
_SELECTED_CMAP = ListedColormap(["#f2f2f2", "#1f5fa8"])  # not selected / selected
_LAYER_CMAP = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.92, 256)))  # no near-white last layer
_USAGE_CMAP = colormaps["magma_r"]  # 0 = white: unused experts read as blank


def _grid(n_panels: int, panel_w: float, panel_h: float, *, left: float = 0.8, right: float = 0.3,
          bottom: float = 0.6, top: float = 0.8, gap_w: float = 0.6, gap_h: float = 0.6, colorbar: bool = False):
    """A figure with n_panels axes of panel_w x panel_h inches, as many columns as fit in MAX_WIDTH_IN, laid out
    with fixed margins in inches (constrained layout costs seconds on a 48-panel figure). Returns
    (fig, axes, ncols, colorbar axes or None)."""
    right += 1.2 if colorbar else 0.0
    ncols = max(1, min(n_panels, int((MAX_WIDTH_IN - left - right + gap_w) // (panel_w + gap_w))))
    nrows = math.ceil(n_panels / ncols)
    W = left + ncols * panel_w + (ncols - 1) * gap_w + right
    area = nrows * panel_h + (nrows - 1) * gap_h
    if colorbar:  # a colour bar and its label need ~2.2 inches: pad a flat figure at the bottom
        bottom += max(0.0, 2.2 - area)
    H = top + area + bottom
    fig = Figure(figsize=(W, H))
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(nrows, ncols, left=left / W, right=1 - right / W, bottom=bottom / H, top=1 - top / H,
                          wspace=gap_w / panel_w, hspace=gap_h / panel_h)
    axes = [fig.add_subplot(gs[i // ncols, i % ncols]) for i in range(n_panels)]
    cax = None
    if colorbar:  # right of the panels, top-aligned, at most 6 inches tall
        h = min(6.0, H - top - 0.6)
        cax = fig.add_axes(((W - right + 0.3) / W, (H - top - h) / H, 0.2 / W, h / H))
    return fig, axes, ncols, cax


def _title(fig: Figure, text: str) -> None:
    fig.suptitle(text, fontsize=13, y=1 - 0.3 / fig.get_figheight())


def _expert_axis(ax, num_experts: int) -> None:
    """Every expert id while they stay legible, else a few evenly spaced integer ticks."""
    if num_experts <= 16:
        ax.set_xticks(range(num_experts))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))


def _layer_axis(ax, layers: list[int]) -> None:
    step = max(1, math.ceil(len(layers) / 16))  # at most ~16 layer labels per panel
    ticks = list(range(0, len(layers), step))
    ax.set_yticks(ticks, [str(layers[i]) for i in ticks])


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def plot_selection_heatmap(selected: dict[str, dict[int, list[int]]], num_experts: int, path) -> Path:
    """One panel per method: rows = MoE layers, columns = experts, a filled cell = the method keeps that expert."""
    if not selected:
        raise ValueError("plot_selection_heatmap: no methods given")
    layers = sorted({layer for per_layer in selected.values() for layer in per_layer})
    row = {layer: i for i, layer in enumerate(layers)}
    panel_w = float(np.clip(num_experts * 0.07, 3.0, 8.0))  # E = 128: two 8-inch panels per row
    panel_h = float(np.clip(len(layers) * 0.13, 1.2, 6.5))
    fig, axes, ncols, _ = _grid(len(selected), panel_w, panel_h, gap_h=0.75)
    for i, (ax, (method, per_layer)) in enumerate(zip(axes, selected.items())):
        grid = np.zeros((len(layers), num_experts), dtype=np.int8)
        for layer, experts in per_layer.items():
            grid[row[layer], list(experts)] = 1
        ax.imshow(grid, cmap=_SELECTED_CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        sizes = sorted({len(e) for e in per_layer.values()})
        K = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        ax.set_title(f"{method} (K = {K})", fontsize=11)
        ax.set_xlabel("expert")
        if i % ncols == 0:
            ax.set_ylabel("MoE layer")
        _expert_axis(ax, num_experts)
        _layer_axis(ax, layers)
    _title(fig, f"Experts kept per layer, by scoring method ({num_experts} experts per layer; filled = kept)")
    return _save(fig, path)


def plot_score_distributions(scores_df: pl.DataFrame, path) -> Path:
    """One panel per method: each layer's scores sorted from best to worst expert, min-max normalised per
    (method, layer) so methods on different scales (frequencies, norms, log-det gains) share one axis. A steep
    curve means the method concentrates on few experts; a flat one means it barely tells them apart."""
    if scores_df.is_empty():
        raise ValueError("plot_score_distributions: no scores given")
    methods = scores_df["method"].unique(maintain_order=True).to_list()
    layers = sorted(scores_df["layer"].unique().to_list())
    num_experts = int(scores_df.group_by("method", "layer").len()["len"].max())
    fig, axes, ncols, cax = _grid(len(methods), 3.6, 2.6, gap_w=0.5, gap_h=0.8, colorbar=True)
    colors = _LAYER_CMAP(np.linspace(0.0, 1.0, len(layers)))
    curves = {(m, layer): np.sort(g["score"].to_numpy().astype(np.float64))[::-1]
              for (m, layer), g in scores_df.group_by("method", "layer")}
    for i, (ax, method) in enumerate(zip(axes, methods)):
        normalised = []
        for color, layer in zip(colors, layers):
            s = curves.get((method, layer))
            if s is None:
                continue
            span = s[0] - s[-1]
            s = (s - s[-1]) / span if span > 0 else np.ones_like(s)
            normalised.append(s)
            ax.plot(np.arange(1, s.size + 1), s, color=color, lw=1.0, alpha=0.7)
        if len({c.size for c in normalised}) == 1:  # a median curve needs every layer to have the same E
            ax.plot(np.arange(1, normalised[0].size + 1), np.median(normalised, axis=0), color="black", lw=1.8,
                    label="median over layers")
            ax.legend(loc="upper right", fontsize=8, frameon=False)
        ax.set_title(method, fontsize=11)
        ax.set_xlabel("expert rank (best first)")
        if i % ncols == 0:
            ax.set_ylabel("normalised score")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlim(1, max(2, num_experts))
        ax.grid(alpha=0.3)
    span = Normalize(min(layers), max(layers) if len(layers) > 1 else min(layers) + 1)
    fig.colorbar(ScalarMappable(span, _LAYER_CMAP), cax=cax, label="MoE layer",
                 ticks=MaxNLocator(nbins=8, integer=True))
    _title(fig, "Score distributions per layer, (score - min) / (max - min) within each layer")
    return _save(fig, path)


def plot_usage_by_domain(usage_df: pl.DataFrame, path) -> Path:
    """One heatmap per MoE layer (rows = domains, columns = experts) of each domain's share of its expert
    selections (`store.usage_by_domain`), on one colour scale shared by all layers."""
    if usage_df.is_empty():
        raise ValueError("plot_usage_by_domain: no usage rows given")
    layers = sorted(usage_df["layer"].unique().to_list())
    domains = sorted(usage_df["domain"].cast(pl.String).unique().to_list())
    num_experts = int(usage_df["expert"].max()) + 1
    li = {layer: i for i, layer in enumerate(layers)}
    di = {d: i for i, d in enumerate(domains)}
    df = usage_df.select("layer", pl.col("domain").cast(pl.String), "expert", "share")
    share = np.zeros((len(layers), len(domains), num_experts))  # never-selected experts stay 0
    share[df["layer"].replace_strict(li).to_numpy(), df["domain"].replace_strict(di).to_numpy(),
          df["expert"].to_numpy()] = df["share"].to_numpy()
    vmax = float(share.max()) or 1.0
    panel_w = float(np.clip(num_experts * 0.06, 3.0, 7.2))  # E = 128: two panels per row
    panel_h = 0.2 * len(domains) + 0.2 if len(layers) > 8 else 0.3 * len(domains) + 0.3  # few layers: taller rows
    left = 0.3 + 0.075 * max(len(d) for d in domains)  # room for the domain names
    fig, axes, ncols, cax = _grid(len(layers), panel_w, panel_h, left=left, gap_w=0.35, gap_h=0.55, colorbar=True)
    for i, (ax, layer) in enumerate(zip(axes, layers)):
        im = ax.imshow(share[li[layer]], cmap=_USAGE_CMAP, vmin=0.0, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9, pad=3)
        # Domain names on the first column only: every panel has the same rows, and 48 x D labels cost seconds.
        ax.set_yticks(range(len(domains)), domains if i % ncols == 0 else [], fontsize=8)
        _expert_axis(ax, num_experts)
        ax.tick_params(axis="x", labelsize=7)
    fig.colorbar(im, cax=cax, label="share of the domain's selections")
    _title(fig, f"Expert usage by corpus domain (columns: {num_experts} experts; uniform share = 1/{num_experts})")
    return _save(fig, path)
