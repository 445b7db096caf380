"""Stage `calibrate`: run the teacher over the calibration split and capture routing (+ expert outputs when a
scoring method in score.methods or the grouping of group.method needs them) to Parquet under calibration/."""

from __future__ import annotations

import logging
import time

from stages._runner import run
from moe2dense.calibrate.capture import calibration_batches, capture_checkpoint
from moe2dense.checkpoint import DTYPES
from moe2dense.checks import calibrated_passes
from moe2dense.io import atomic_dir, write_json, write_timings
from moe2dense.params import load_params
from moe2dense.teacher.load import resolve_device
from moe2dense.teacher.source import teacher_checkpoint, validate_checkpoint_dir

PACKED = "data/prepared/packed/calibration.parquet"
OUT = "calibration"
METRICS = "metrics/calibrate.json"


def main() -> None:
    params = load_params()
    c = params.calibrate
    needs = calibrated_passes(params)  # what score and group will read
    teacher = teacher_checkpoint("models/teacher")  # a moved or truncated teacher fails here, naming the file
    validate_checkpoint_dir(teacher)
    batches = calibration_batches(PACKED, c.batch_size, max_tokens=c.max_tokens or None)
    start = time.perf_counter()
    with atomic_dir(OUT) as out:
        stats = capture_checkpoint(teacher, batches, out, offload=c.offload, dtype=DTYPES[c.dtype],
                                   device=resolve_device(c.device), needs=needs, store_probs=c.store_probs,
                                   row_group_rows=c.row_group_rows, token_chunk=c.token_chunk,
                                   expert_pass_bytes=c.expert_pass_mb * 2**20)
    seconds = time.perf_counter() - start
    n_tokens = next(iter(stats.values())).n_tokens
    write_json(METRICS, {"tokens": n_tokens, "moe_layers": len(stats), "passes": sorted(needs),
                         "store_probs": c.store_probs})
    write_timings("calibrate", {"seconds": round(seconds, 2), "tokens_per_s": round(n_tokens / seconds, 1)})
    logging.info("captured %d tokens x %d MoE layers (%s) at %.0f tokens/s", n_tokens, len(stats),
                 ", ".join(sorted(needs)), n_tokens / seconds)


if __name__ == "__main__":
    run("calibrate", main)
