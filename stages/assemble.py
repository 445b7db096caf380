"""Stage `assemble`: execute grouping/plan.json on the teacher checkpoint, layer by layer, into the dense student
models/student (a standard Hugging Face checkpoint dir). Everything the plan decides (blocks, merge weights,
scales) was decided by stage group; assemble only reads the validated plan."""

from __future__ import annotations

import logging

from stages._runner import run
from moe2dense.assemble import assemble
from moe2dense.checkpoint import CheckpointReader
from moe2dense.io import atomic_dir, write_json
from moe2dense.params import load_params
from moe2dense.plan import read_plan
from moe2dense.teacher.source import teacher_checkpoint

TEACHER = "models/teacher"  # holds the tokenizer for the demo and for real teachers (pointer dir)
PLAN = "grouping/plan.json"
OUT = "models/student"
METRICS = "metrics/assemble.json"


def main() -> None:
    params = load_params()
    a = params.assemble
    plan = read_plan(PLAN)
    checkpoint = teacher_checkpoint(TEACHER)
    with CheckpointReader(checkpoint) as reader:
        teacher_params = sum(reader.nbytes(n) // reader.dtype(n).itemsize for n in reader.keys())
    with atomic_dir(OUT) as out:
        summary = assemble(checkpoint, plan, out, dtype=a.dtype, max_shard_bytes=int(a.max_shard_gb * 2**30),
                           tokenizer_dir=TEACHER)
    summary |= {"teacher_parameters": teacher_params,
                "parameter_ratio": round(summary["num_parameters"] / teacher_params, 6)}
    write_json(METRICS, summary)
    logging.info("dense %s with %s parameters (%.1f%% of the teacher's %s) -> %s", summary["model_type"],
                 f"{summary['num_parameters']:,}", 100 * summary["parameter_ratio"], f"{teacher_params:,}", OUT)


if __name__ == "__main__":
    run("assemble", main)
