"""One-shot conversion for users who do not need the pipeline: calibrate -> score -> select -> group -> assemble,
through the same library calls the DVC stages make, with the calibration run kept in a temp dir.

    python -m moe2dense convert --teacher DIR --method do_acp --experts K --out DIR

The arguments become the pipeline's params sections (`convert_params`), validated by the same models, so a bad
value gets the pipeline's error under the flag's name; the calibration passes come from the same rule
(`checks.calibrated_passes`), the calibration rows from the same packing (`data.packing.Packer`). Every argument is
checked against the teacher's config before the teacher is loaded, so a wrong K or method fails in a second, not
after calibration.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from moe2dense import params as P
from moe2dense.arch import get_adapter
from moe2dense.assemble import assemble
from moe2dense.calibrate.capture import capture_checkpoint
from moe2dense.calibrate.store import read_meta
from moe2dense.checkpoint import DTYPES, CheckpointReader
from moe2dense.checks import calibrated_passes
from moe2dense.data.packing import Packer
from moe2dense.data.sources import iter_corpus
from moe2dense.data.tokenizer import batched_encode, eos_id, load_tokenizer
from moe2dense.io import atomic_dir
from moe2dense.plan import CalibrationInfo, build_plan, plan_scaling, write_plan
from moe2dense.scoring import DO_ACP_LAMBDA
from moe2dense.selection import check_budget, score_frame, score_options, select_from_scores
from moe2dense.teacher.load import resolve_device
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
    offload: str = "auto"  # calibrate.offload: auto | layer | none
    device: str = "auto"
    student_dtype: str = "auto"
    do_acp_lambda: float = DO_ACP_LAMBDA
    overwrite: bool = False
    progress: bool = True


#: params key -> the flag that sets it: convert's errors name what the user typed.
FLAGS = {
    "calibrate.max_tokens": "--calibration-tokens", "calibrate.batch_size": "--batch-size",
    "calibrate.offload": "--offload",
    "calibrate.dtype": "--dtype", "score.method": "--method", "score.methods": "--method",
    "score.options.do_acp.lam": "do_acp_lambda", "select.experts": "--experts", "group.method": "--group",
    "group.k": "--blocks", "group.align": "--align", "group.scaling": "--scaling", "assemble.dtype": "--student-dtype",
}
_KEYS = re.compile("|".join(re.escape(k) for k in sorted(FLAGS, key=len, reverse=True)) + r"(?=\W|$)")


def flagged(message: str) -> str:
    """`message` with every params key convert sets replaced by its flag."""
    return _KEYS.sub(lambda m: FLAGS[m.group(0)], message)


def convert_params(args: ConvertArgs) -> P.Params:
    """The pipeline's params sections for these arguments, validated by the pipeline's own models (a bad value
    gets the pipeline's error, under the flag's name; one line). --device is checked by `resolve_device`: it also
    takes cuda:N, which calibrate.device does not."""
    data = {
        "calibrate": {"max_tokens": args.calibration_tokens, "batch_size": args.batch_size, "dtype": args.dtype,
                      "offload": args.offload},
        "score": {"method": args.method, "methods": [args.method], "options": {"do_acp": {"lam": args.do_acp_lambda}}},
        "select": {"experts": args.experts},
        "group": {"method": args.group, "k": args.blocks, "align": args.align, "scaling": args.scaling},
        "assemble": {"dtype": args.student_dtype},
    }
    try:
        return P.Params.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False):
            key = ".".join(str(part) for part in e["loc"] if not isinstance(part, int))
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            line = flagged(f"{key}: {msg}" if key else msg)
            if not isinstance(given, (dict, list)):
                line += f" (got {given!r})"
            if line not in problems:  # a bad --method is both score.method and score.methods[0]
                problems.append(line)
        raise ValueError("; ".join(problems)) from None


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


def _check(args: ConvertArgs, params: P.Params) -> _Checked:
    """Every check that needs no weights beyond the params models': the teacher's files and config, K, sizes,
    paths."""
    if args.calibration_tokens < 1:  # calibrate.max_tokens 0 means "the whole split", which convert does not have
        raise ValueError(f"--calibration-tokens must be >= 1, got {args.calibration_tokens}")
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
    adapter = get_adapter(config)  # an unsupported family or quantization scheme fails here
    K, g = params.select.experts, params.group
    try:
        check_budget(K, adapter.top_k, adapter.num_experts)
    except ValueError as err:
        raise ValueError(flagged(str(err))) from None
    blocks = adapter.top_k if g.k is None else g.k  # None is the default; 0 was refused by GroupParams
    if not 1 <= blocks <= K:
        raise ValueError(f"--blocks {blocks} must be in [1, --experts {K}]")
    if blocks == K:
        log.info("--experts == blocks == %d: pure pruning, --group %s and --align are ignored", blocks, g.method)
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
    """Documents tokenized with the teacher's tokenizer and packed as the pipeline packs its splits (`Packer`: per
    domain, rows of seq_len tokens separated by EOS), until `calibration_tokens` tokens are full rows."""
    packer, n_rows = Packer(seq_len, eos_id(tokenizer)), max(1, args.calibration_tokens // seq_len)
    rows: list[np.ndarray] = []
    domains: list[str] = []
    docs = iter(_documents(args))
    while len(rows) < n_rows:
        batch = [d for _, d in zip(range(64), docs)]
        if not batch:
            break
        for (domain, _), ids in zip(batch, batched_encode(tokenizer, [t for _, t in batch])):
            block = packer.add(domain, ids)[: n_rows - len(rows)]
            rows.extend(block)
            domains.extend([domain] * len(block))
    if not rows:
        what = f"--data {args.data}" if args.data is not None else "the demo corpus"
        raise ValueError(f"{what} has fewer than --seq-len {seq_len} tokens of text; give more text or a smaller "
                         "--seq-len")
    return np.asarray(rows, dtype=np.int64), domains


def convert(args: ConvertArgs) -> dict:
    params = convert_params(args)
    c = _check(args, params)
    checkpoint, adapter = c.checkpoint, c.adapter
    tokenizer = load_tokenizer(checkpoint)
    check_tokenizer(tokenizer, checkpoint)
    ids, domains = calibration_rows(args, tokenizer, c.seq_len)  # bad or short data fails before the weights load
    if ids.max() >= c.vocab_size:
        raise ValueError(f"{checkpoint}: the tokenizer produced token id {int(ids.max())} but config.json "
                         f"vocab_size is {c.vocab_size}: tokenizer and model do not match")
    cal, score, group = params.calibrate, params.score, params.group
    batches = [(ids[i:i + cal.batch_size], domains[i:i + cal.batch_size]) for i in range(0, len(ids), cal.batch_size)]
    # From here on the stages' own calls: calibrate, score, select, group, assemble.
    with tempfile.TemporaryDirectory(prefix="moe2dense-calibration-") as calibration:
        stats = capture_checkpoint(checkpoint, batches, calibration, offload=cal.offload, dtype=DTYPES[cal.dtype],
                                   device=resolve_device(args.device, "--device"), needs=calibrated_passes(params),
                                   store_probs=cal.store_probs, row_group_rows=cal.row_group_rows,
                                   token_chunk=cal.token_chunk, expert_pass_bytes=cal.expert_pass_mb * 2**20,
                                   progress=args.progress)
        scores = score_frame(stats, score.methods, score_options(score))
        order = select_from_scores(scores, score.method, params.select.experts, adapter.top_k)
        with CheckpointReader(checkpoint) as reader:
            plan = build_plan(adapter, stats, order, scores=scores, score_method=score.method,
                              group_method=group.method, blocks=c.blocks, align=group.align,
                              scaling=plan_scaling(params), reader=reader, calibration=calibration,
                              shared_gate_mean=read_meta(calibration).get("shared_gate_mean", {}))
    plan = plan.model_copy(update={"calibration": CalibrationInfo(tokens=int(ids.size), seq_len=c.seq_len,
                                                                  data=args.data or "demo corpus")})
    with atomic_dir(args.out) as out:
        summary = assemble(checkpoint, plan, out, dtype=params.assemble.dtype, tokenizer_dir=checkpoint,
                           progress=args.progress)
        write_plan(out / PLAN_FILE, plan)
    return summary
