"""Stage `prune`: the dense-to-dense baseline's starting point. The dense teacher (models/dense_teacher) is
width-pruned to the M2D student's parameter count (models/student/config.json) with the importance of
baselines.prune.importance, into models/baseline_d2d (a stock Hugging Face checkpoint with its card)."""

from __future__ import annotations

import logging
from pathlib import Path

from stages._runner import run
from moe2dense.baselines.importance import ImportanceInputs, importance, needs_calibration
from moe2dense.baselines.prune import choose_sizes, prune, pruned_config, read_layout, transformers_count
from moe2dense.baselines.runs import DENSE_TEACHER, RUNS, STUDENT
from moe2dense.checkpoint import TOKENIZER_FILES
from moe2dense.io import atomic_dir, write_json, write_timings
from moe2dense.params import load_params
from moe2dense.teacher.source import VOCAB_FILES, teacher_checkpoint

STUDENT_CONFIG = f"{STUDENT}/config.json"
PACKED = "data/prepared/packed/calibration.parquet"
OUT = RUNS["d2d"].initial
METRICS = "metrics/baselines/prune.json"


def student_parameters(path: str | Path) -> int:
    from transformers import AutoConfig

    from moe2dense.assemble import student_num_parameters

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the target parameter count is the M2D student's: run `dvc repro "
                                "assemble` first")
    return student_num_parameters(AutoConfig.from_pretrained(str(path.parent), local_files_only=True))


def main() -> None:
    params = load_params()
    p = params.baselines.prune
    # ---- every check that reads no weight
    if not Path(DENSE_TEACHER).is_dir():
        raise FileNotFoundError(f"{DENSE_TEACHER}: missing; the dense teacher comes from baselines.dense_teacher "
                                "(its stage writes this dir)")
    checkpoint = teacher_checkpoint(DENSE_TEACHER)
    layout = read_layout(checkpoint)
    if not any((Path(DENSE_TEACHER) / f).is_file() for f in VOCAB_FILES):
        raise FileNotFoundError(f"{DENSE_TEACHER}: no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...) to copy "
                                "beside the pruned model")
    calibrated = needs_calibration(p.importance)
    if calibrated and not Path(PACKED).is_file():
        raise FileNotFoundError(f"{PACKED}: missing; baselines.prune.importance {p.importance!r} runs the dense "
                                "teacher on the calibration split (`dvc repro prepare`), or choose magnitude")
    target = student_parameters(STUDENT_CONFIG)
    sizes = choose_sizes(layout, target, p.max_mlp_cut)
    built = transformers_count(pruned_config(layout, sizes.hidden, sizes.width))
    if built != sizes.parameters:
        raise ValueError(f"{checkpoint}: its tensors count {sizes.parameters:,} parameters at hidden {sizes.hidden}, "
                         f"MLP {sizes.width}, but transformers builds {built:,} from its config.json; the "
                         "checkpoint lacks tensors or holds extra ones")
    logging.info("target %s parameters: hidden %d -> %d, MLP %d -> %d (multiple of %d): %s (%+.3f%%)",
                 f"{target:,}", layout.hidden, sizes.hidden, layout.width, sizes.width, sizes.multiple,
                 f"{sizes.parameters:,}", 100 * sizes.relative_error)
    # ---- importance, then the streamed copy
    scores = importance(p.importance, ImportanceInputs(
        checkpoint, Path(PACKED) if calibrated else None, p.calibration_tokens or None, p.batch_size, p.device,
        p.dtype))
    shard = int(params.assemble.max_shard_gb * 2**30)  # one shard size for every checkpoint the project writes
    with atomic_dir(OUT) as out:
        prune(layout, checkpoint, out, sizes, scores.mlp, scores.hidden, importance=p.importance,
              source=str(checkpoint), tokens=scores.tokens, tokenizer_dir=DENSE_TEACHER, max_shard_bytes=shard)
    write_json(METRICS, {"importance": p.importance, "parameters": sizes.parameters, "target_parameters": target,
                         "relative_error": round(sizes.relative_error, 6), "hidden_size": sizes.hidden,
                         "intermediate_size": sizes.width, "teacher_hidden_size": layout.hidden,
                         "teacher_intermediate_size": layout.width, "calibration_tokens": scores.tokens})
    write_timings("prune", {"importance_seconds": round(scores.seconds, 2)})
    logging.info("pruned %s -> %s", checkpoint, OUT)


if __name__ == "__main__":
    run("prune", main)
