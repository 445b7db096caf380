"""Resolving `teacher.source` offline: a local checkpoint dir, or a hub id already in the local HF cache.

The `teacher` stage output `models/teacher/` is either the demo checkpoint itself or, for a real model, a small
pointer dir (`source.json` + config + tokenizer) so a 60 GB teacher is never copied into the DVC cache."""

from __future__ import annotations

import json
from pathlib import Path

POINTER = "source.json"
# Files that carry a tokenizer's vocabulary; tokenizer_config.json alone is not enough: transformers then builds an
# empty tokenizer (one token) without complaint and every text encodes to nothing.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


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


def validate_checkpoint_dir(path: str | Path) -> dict:
    """Every check of a checkpoint dir that loads no weights, with the file named in each error: config.json is
    JSON and states the sizes the family needs (no silent library defaults), every safetensors header parses and its
    tensors fit inside the file (a truncated or corrupt download fails here, not mid-load), and a tokenizer
    vocabulary is present. Used by the teacher stage, calibrate and convert. Returns config.json as a dict."""
    from moe2dense.arch.registry import check_config_keys
    from moe2dense.checkpoint import CheckpointReader

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TeacherSourceError(f"{config_file}: missing; a checkpoint dir holds config.json, *.safetensors and "
                                 "the tokenizer files")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    check_config_keys(raw, config_file)
    weight_files(path)
    CheckpointReader(path).close()  # parses every header and checks each tensor's extent against the file size
    if not any((path / name).is_file() for name in VOCAB_FILES):
        raise TeacherSourceError(f"{path}: no tokenizer vocabulary (looked for {', '.join(VOCAB_FILES)}); copy the "
                                 "model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) beside its "
                                 "config.json")
    return raw


def check_tokenizer(tokenizer, path: str | Path) -> None:
    """A loaded tokenizer must have a vocabulary (guards against tokenizers built from a config alone)."""
    if len(tokenizer) < 2:
        raise ValueError(f"{path}: the tokenizer loads with {len(tokenizer)} token(s); its vocabulary files are "
                         "missing or empty")


def teacher_checkpoint(teacher_dir: str | Path = "models/teacher") -> Path:
    """The directory with the teacher's weights: the stage output itself, or where its pointer leads."""
    teacher_dir = Path(teacher_dir)
    pointer = teacher_dir / POINTER
    if pointer.is_file():
        try:
            path = Path(json.loads(pointer.read_text())["path"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise TeacherSourceError(f"{pointer}: corrupt teacher pointer ({err!r}); rerun `dvc repro teacher`") \
                from None
        if not (path / "config.json").is_file():
            raise TeacherSourceError(f"{pointer}: the teacher was recorded at {path}, which no longer holds a "
                                     "checkpoint (moved or deleted?); put it back there, or set teacher.source to "
                                     "where it is now and rerun `dvc repro teacher`")
        return path
    if not (teacher_dir / "config.json").is_file():
        raise TeacherSourceError(f"{teacher_dir} holds no teacher; run `dvc repro teacher` first")
    return teacher_dir
