"""Markdown tables: the one renderer behind the report, the screen's results, the sweep comparison, the pipeline
flow's artifact, the model card and the README's generated method tables.

Cells are written as given, unpadded (`| a | b |`): the outputs are DVC-tracked and must not change when a column
widens. (tabulate pads every column to its widest cell, so one long value would rewrite every line.)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def _line(cells: Iterable[object]) -> str:
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def table(header: Sequence[object], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """Lines of a GitHub markdown table. `align`: one letter a column, `r` right-aligns it (numbers); any other
    letter, or a column past the end of `align`, keeps the default alignment."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align.ljust(len(header), "l")) + "|"
    return [_line(header), rule, *(_line(r) for r in rows)]


def render(header: Sequence[object], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """`table` joined into text, with a final newline."""
    return "\n".join(table(header, rows, align)) + "\n"
