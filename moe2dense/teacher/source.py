"""Resolving `teacher.source` offline: a local checkpoint dir, or a hub id already in the local HF cache.

The `teacher` stage output `models/teacher/` is either the demo checkpoint itself or, for a real model, a small
pointer dir (`source.json` + config + tokenizer) so a 60 GB teacher is never copied into the DVC cache."""

from __future__ import annotations

import json
from pathlib import Path

POINTER = "source.json"


class TeacherSourceError(FileNotFoundError):
    pass


def resolve_checkpoint(source: str) -> Path:
    """Return the local directory holding `source`'s config and weights, without touching the network."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TeacherSourceError(f"teacher.source={source!r}: {path} has no config.json; point it at a Hugging "
                                     "Face checkpoint dir (config.json + *.safetensors + tokenizer files)")
        return path.resolve()
    if source.count("/") > 1 or source.startswith((".", "~")):
        raise TeacherSourceError(f"teacher.source={source!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, HFValidationError, ...
        raise TeacherSourceError(
            f"teacher.source={source!r} is neither a local directory nor a hub id in the local HF cache ({err}). "
            f"Offline machines: run `huggingface-cli download {source}` where there is network and copy the HF "
            f"cache (~/.cache/huggingface/hub, or $HF_HOME) here, or set teacher.source to the checkpoint dir."
        ) from None


def weight_files(checkpoint: Path) -> list[str]:
    files = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    if not files:
        raise TeacherSourceError(f"{checkpoint}: no *.safetensors weights (pytorch_model.bin checkpoints are not "
                                 "read; convert with `model.save_pretrained(dir, safe_serialization=True)`)")
    return files


def teacher_checkpoint(teacher_dir: str | Path = "models/teacher") -> Path:
    """The directory with the teacher's weights: the stage output itself, or where its pointer leads."""
    teacher_dir = Path(teacher_dir)
    pointer = teacher_dir / POINTER
    if pointer.is_file():
        return Path(json.loads(pointer.read_text())["path"])
    if not (teacher_dir / "config.json").is_file():
        raise TeacherSourceError(f"{teacher_dir} holds no teacher; run `dvc repro teacher` first")
    return teacher_dir
