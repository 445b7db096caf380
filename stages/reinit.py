"""Stage `reinit@<baseline>` (`python -m stages.reinit random_ffn|random_init`): the random baselines at the M2D
student's architecture -> models/baseline_<baseline> (a stock HF checkpoint with its card), before distillation."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages._runner import run
from moe2dense import methods as M
from moe2dense.assemble import copy_tokenizer
from moe2dense.baselines.reinit import build
from moe2dense.baselines.runs import RUNS, STUDENT, TEACHER
from moe2dense.io import atomic_dir
from moe2dense.params import load_params
from moe2dense.teacher.load import teacher_config

KINDS = ("random_ffn", "random_init")
CARD = """---
library_name: transformers
tags: [moe2dense, baseline, {kind}]
---

# Baseline `{kind}` at the M2D student's size

{summary}. Architecture: the M2D student's at `{student}` ({parameters:,} parameters); seed {seed}. This is the
baseline before distillation{mlps}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.reinit")
    parser.add_argument("kind", choices=KINDS)
    kind = parser.parse_args().kind
    seed = load_params().baselines.seed
    for path in (f"{STUDENT}/config.json",):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found: run `dvc repro assemble` first")
    model, redrawn = build(kind, STUDENT, teacher_config(TEACHER), seed)
    out_dir = RUNS[kind].initial
    with atomic_dir(out_dir) as out:
        model.save_pretrained(out)
        copy_tokenizer(Path(STUDENT), out)
        mlps = f"; re-initialised: {len(redrawn)} MLP modules ({redrawn[0]}, ...)" if redrawn else ""
        (out / "README.md").write_text(CARD.format(
            kind=kind, summary=M.get("baseline", kind).summary, student=STUDENT, seed=seed, mlps=mlps,
            parameters=sum(p.numel() for p in model.parameters())))
    logging.info("%s -> %s (%d MLP modules re-initialised)", kind, out_dir, len(redrawn))


if __name__ == "__main__":
    run("reinit", main)
