"""Scoring, selection, grouping, the distillation losses and routing: values and errors pinned by hand."""
from __future__ import annotations
