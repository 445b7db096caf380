"""One-shot conversion for users who do not need the pipeline: calibrate -> score -> select -> group -> assemble,
through the same library calls the DVC stages make, with the calibration run kept in a temp dir.

    python -m moe2dense convert --teacher DIR --method do_acp --experts K --out DIR

Every argument is checked against the teacher's config before the teacher is loaded, so a wrong K or method fails
in a second, not after calibration.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np

from moe2dense import params as P
from moe2dense.arch import get_adapter
from moe2dense.assemble import assemble
from moe2dense.calibrate.capture import capture
from moe2dense.calibrate.store import read_meta
from moe2dense.checkpoint import CheckpointReader
from moe2dense.data.sources import iter_corpus
from moe2dense.data.tokenizer import batched_encode, eos_id, load_tokenizer
from moe2dense.grouping import GROUP_METHODS, required_input
from moe2dense.io import atomic_dir, write_json
from moe2dense.plan import build_plan, merge_score_method
from moe2dense.scaling import SCALINGS
from moe2dense.scoring import DO_ACP_LAMBDA, SCORERS, required_capture
from moe2dense.selection import check_budget, select_layers
from moe2dense.teacher.load import DTYPES, resolve_device
from moe2dense.teacher.source import check_tokenizer, resolve_checkpoint, validate_checkpoint_dir

log = logging.getLogger(__name__)
DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
PLAN_FILE = "moe2dense_plan.json"  # in every student convert writes: what marks a dir --overwrite may replace


@dataclass(frozen=True)
class ConvertArgs:
    teacher: str
    out: str
    method: str
    experts: int
    group: str = "output"
    blocks: int | None = None  # dense blocks per layer; None = the router's top-k
    align: bool = False
    scaling: str = "uniform"
    data: str | None = None  # None: the offline demo corpus
    text_column: str = "text"
    calibration_tokens: int = 131_072
    seq_len: int | None = None  # None: min(2048, the teacher's context)
    batch_size: int = 8
    dtype: str = "float32"  # teacher during calibration
    device: str = "auto"
    student_dtype: str = "auto"
    do_acp_lambda: float = DO_ACP_LAMBDA
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class _Checked:
    checkpoint: Path
    adapter: object
    blocks: int
    seq_len: int
    vocab_size: int


def _overlap(a: Path, b: Path) -> bool:
    """a equals b, or one contains the other (both resolved, symlinks included)."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _check_out(out: Path, protected: dict[str, Path]) -> None:
    """--out is replaced wholesale at the end (with --overwrite, whatever was there is deleted): it must not be,
    contain or lie inside the teacher or the calibration data, may only replace an earlier student, and its parent
    must be writable."""
    real = out.expanduser().resolve()
    for name, path in protected.items():
        if _overlap(real, path.resolve()):
            raise ValueError(f"--out {out} overlaps {name} {path} (same, inside or containing it); replacing it "
                             "would delete it: choose another --out")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / PLAN_FILE).is_file())):
        # --overwrite deletes what --out holds: only ever an earlier student of this command (or nothing)
        raise FileExistsError(f"--out {out} is not a student written by convert (no {PLAN_FILE} in it); "
                              "--overwrite only replaces one: choose a new or empty directory")
    parent = next(p for p in real.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot write in {parent}")


def _check(args: ConvertArgs) -> _Checked:
    """Every check that needs no weights: the teacher's files and config, K, methods, sizes, paths."""
    if args.method not in SCORERS:
        raise ValueError(f"--method {args.method!r} is not a scoring method; choose one of {tuple(SCORERS)}")
    if args.group not in GROUP_METHODS:
        raise ValueError(f"--group {args.group!r} is not a grouping method; choose one of {GROUP_METHODS}")
    if args.scaling not in SCALINGS:
        raise ValueError(f"--scaling {args.scaling!r} is not a scaling; choose one of {tuple(SCALINGS)}")
    for name, value in (("--dtype", args.dtype), ("--student-dtype", args.student_dtype)):
        if value not in DTYPES and not (name == "--student-dtype" and value == "auto"):
            raise ValueError(f"{name} {value!r}: choose one of {tuple(DTYPES)}")
    for name, value in (("--calibration-tokens", args.calibration_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    resolve_device(args.device, "--device")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    protected = {}
    if args.data is not None:
        data = Path(args.data)
        if not data.exists():
            raise FileNotFoundError(f"--data {data}: no such file or directory")
        if data.is_file() and data.suffix not in DATA_SUFFIXES:
            raise ValueError(f"--data {data}: unsupported file type; allowed: {', '.join(DATA_SUFFIXES)}")
        protected["--data"] = data
    checkpoint = resolve_checkpoint(args.teacher)
    _check_out(out, {"the teacher": checkpoint, **protected})
    validate_checkpoint_dir(checkpoint)  # config keys, safetensors headers, tokenizer files
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    adapter = get_adapter(config)  # unsupported family / quantized experts fail here
    check_budget(args.experts, adapter.top_k, adapter.num_experts)
    blocks = adapter.top_k if args.blocks is None else args.blocks  # None is the default; 0 is an error, not None
    if not 1 <= blocks <= args.experts:
        raise ValueError(f"--blocks {blocks} must be in [1, --experts {args.experts}]")
    if blocks == args.experts:
        log.info("--experts == blocks == %d: pure pruning, --group %s and --align are ignored", blocks, args.group)
    context = getattr(config, "max_position_embeddings", None) or 2048
    seq_len = min(2048, context) if args.seq_len is None else args.seq_len
    if not 1 <= seq_len <= context:
        raise ValueError(f"--seq-len {seq_len} must be in [1, {context}] (the teacher's max_position_embeddings)")
    return _Checked(checkpoint, adapter, blocks, seq_len, int(config.vocab_size))


def _documents(args: ConvertArgs) -> Iterator[tuple[str, str]]:
    """(domain, text): the user's file, or the demo corpus with its domains interleaved so a small token budget
    still sees all of them."""
    if args.data is not None:
        src = P.FilesSource(kind="files", paths=[args.data], text_column=args.text_column)
        for doc in iter_corpus([src]):
            yield doc.domain, doc.text
        return
    sources = P.PrepareParams().corpus
    streams = [iter_corpus([s]) for s in sources]
    for docs in zip_longest(*streams):
        for doc in docs:
            if doc is not None:
                yield doc.domain, doc.text


def calibration_rows(args: ConvertArgs, tokenizer, seq_len: int) -> tuple[np.ndarray, list[str]]:
    """Documents tokenized with the teacher's tokenizer, packed per domain into rows of seq_len tokens separated by
    EOS, until `calibration_tokens` tokens are full rows."""
    sep, n_rows = eos_id(tokenizer), max(1, args.calibration_tokens // seq_len)
    buffers: dict[str, list[int]] = {}
    rows, domains = [], []
    docs = iter(_documents(args))
    while len(rows) < n_rows:
        batch = [d for _, d in zip(range(64), docs)]
        if not batch:
            break
        for (domain, _), ids in zip(batch, batched_encode(tokenizer, [t for _, t in batch])):
            buf = buffers.setdefault(domain, [])
            buf.extend(ids + [sep])
            while len(buf) >= seq_len and len(rows) < n_rows:
                rows.append(buf[:seq_len])
                domains.append(domain)
                del buf[:seq_len]
    if not rows:
        what = f"--data {args.data}" if args.data is not None else "the demo corpus"
        raise ValueError(f"{what} has fewer than --seq-len {seq_len} tokens of text; give more text or a smaller "
                         "--seq-len")
    return np.asarray(rows, dtype=np.int64), domains


def convert(args: ConvertArgs) -> dict:
    c = _check(args)
    checkpoint, adapter = c.checkpoint, c.adapter
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(checkpoint)
    check_tokenizer(tokenizer, checkpoint)
    ids, domains = calibration_rows(args, tokenizer, c.seq_len)  # bad or short data fails before the weights load
    if ids.max() >= c.vocab_size:
        raise ValueError(f"{checkpoint}: the tokenizer produced token id {int(ids.max())} but config.json "
                         f"vocab_size is {c.vocab_size}: tokenizer and model do not match")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[args.dtype], local_files_only=True)
    model = model.to(resolve_device(args.device, "--device")).eval().requires_grad_(False)
    methods = [args.method, merge_score_method(args.method)]
    needs = required_capture(methods)
    pure = c.blocks == args.experts
    if not pure and required_input(args.group) == "gram":
        needs = needs | {"all_outputs"}
    batches = [(ids[i:i + args.batch_size], domains[i:i + args.batch_size])
               for i in range(0, len(ids), args.batch_size)]
    with tempfile.TemporaryDirectory(prefix="moe2dense-calibration-") as calibration:
        stats = capture(model, batches, calibration, needs=needs, progress=args.progress)
        del model
        order = select_layers(args.method, stats, args.experts, adapter.top_k, lam=args.do_acp_lambda)
        with CheckpointReader(checkpoint) as reader:
            plan = build_plan(adapter, stats, order, score_method=args.method, group_method=args.group,
                              blocks=c.blocks, align=args.align, scaling=args.scaling, reader=reader,
                              calibration=calibration,
                              shared_gate_mean=read_meta(calibration).get("shared_gate_mean", {}))
    plan["calibration"] = {"tokens": int(ids.size), "seq_len": c.seq_len, "data": args.data or "demo corpus"}
    with atomic_dir(args.out) as out:
        summary = assemble(checkpoint, plan, out, dtype=args.student_dtype, tokenizer_dir=checkpoint,
                           progress=args.progress)
        write_json(out / PLAN_FILE, plan)
    return summary
