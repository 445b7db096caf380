"""`python -m moe2dense <command>`: small user-facing commands beside the DVC stages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe2dense.params import ParamsError, load_params


#: What `check-params --stamp` writes: constant bytes, so a valid edit of params.yaml reruns only the DVC stage
#: `check`, never the stages downstream of its output.
STAMP = "params.yaml passed `python -m moe2dense check-params`\n"


def check_params(args: argparse.Namespace) -> int:
    """Every params check (pydantic sections, then moe2dense.checks.preflight) without loading any model."""
    from moe2dense.checks import calibrated_passes, preflight, set_offline_env
    from moe2dense.io import atomic_file, write_json

    set_offline_env()
    path = Path(args.params_opt or args.params)
    try:
        params = load_params(path)
        preflight(params, path.resolve().parent, origin=str(path))  # relative paths in it: beside the file
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2
    if args.stamp:
        with atomic_file(args.stamp) as fh:
            fh.write(STAMP)
    if args.passes:  # calibrate's dep: it reruns when the passes change, not on every score.methods/group.method edit
        write_json(args.passes, {"passes": sorted(calibrated_passes(params))})
    print(f"{path}: OK ({', '.join(type(params).model_fields)})")
    return 0


def summary(args: argparse.Namespace) -> int:
    """Print the headline metrics of the last run, one line per metrics file."""
    root = Path(args.metrics)
    files = sorted(root.glob("*.json")) if root.is_dir() else []
    if not files:
        print(f"no metrics under {root}/ yet: run `make demo` (or `dvc repro`)", file=sys.stderr)
        return 1
    for path in files:
        data = json.loads(path.read_text())
        flat = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}
        if flat:
            print(f"{path.stem:>10}: " + ", ".join(f"{k}={v}" for k, v in sorted(flat.items())))
    evaluation = root / "eval.json"
    if evaluation.is_file():  # nested: one line per model with each task's headline metric
        for model, result in json.loads(evaluation.read_text()).items():
            heads = [f"{task} {m}={res[m]:.4g}" for task, res in sorted(result.items()) if task not in ("size", "path")
                     for m in ("bits_per_byte", "acc") if m in res]
            print(f"{'eval ' + model:>16}: " + ", ".join(heads))
    report = root.parent / "reports" / "summary.md"
    if report.is_file():
        print(f"{'report':>10}: {report}")
    return 0


def convert(args: argparse.Namespace) -> int:
    """One-shot MoE -> dense conversion (calibrate, score, select, group, assemble)."""
    import logging
    import os

    from moe2dense.checks import set_offline_env

    set_offline_env()
    logging.basicConfig(level=os.environ.get("MOE2DENSE_LOG", "INFO"), format="[convert] %(message)s")
    from moe2dense.convert import ConvertArgs, convert as run_convert

    fields = {k: v for k, v in vars(args).items() if k in ConvertArgs.__dataclass_fields__}
    try:
        summary = run_convert(ConvertArgs(**fields))
    except (ValueError, OSError, KeyError) as err:  # OSError: also a read-only or full disk under --out
        msg = err.args[0] if isinstance(err, KeyError) else err
        if isinstance(err, OSError) and err.errno is not None:  # the system's wording, with the file it concerns
            msg = f"{err.strerror}: {err.filename or args.out}"
        print(f"[convert] error: {msg}", file=sys.stderr)
        if os.environ.get("MOE2DENSE_DEBUG"):
            raise
        return 2
    print(f"[convert] wrote a dense {summary['model_type']} with {summary['num_parameters']:,} parameters "
          f"(MLP width {summary['intermediate_size']}) to {args.out}")
    return 0


def compare(args: argparse.Namespace) -> int:
    """Headline metrics (and the params that differ) of committed results across git branches or revisions."""
    from moe2dense import sweep as sw

    try:
        rows = sw.exp_rows(sw.exp_show(args.repo, *args.revs, all_branches=not args.revs))
    except sw.SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [r for r in rows if r["baseline"] or args.experiments]
    if not rows:
        print("error: no committed results to compare (commit dvc.lock and metrics/ after `dvc repro`)",
              file=sys.stderr)
        return 1
    what = ", ".join(args.revs) if args.revs else "every branch"
    md = sw.markdown(sw.table(rows), f"moe2dense results across {what}",
                     note="Params shown: those that differ between the rows; metrics: the headline ones.")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
    print(md, end="")
    return 0


def methods(args: argparse.Namespace) -> int:
    """The method table (moe2dense/methods.py) as markdown; --readme FILE rewrites its generated tables in place."""
    from moe2dense import methods as M

    if args.readme:
        path = Path(args.readme)
        text = M.update_readme(path.read_text())
        if text != path.read_text():
            path.write_text(text)
            print(f"{path}: method tables updated")
        return 0
    if bad := [k for k in args.kind if k not in M.KINDS]:
        print(f"error: unknown kind(s) {bad}; allowed: {', '.join(M.KINDS)}", file=sys.stderr)
        return 2
    for kind in args.kind or M.KINDS:
        print(M.markdown(kind))
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    from moe2dense.methods import names

    p.add_argument("--teacher", required=True, help="MoE checkpoint dir, or a hub id in the local HF cache")
    p.add_argument("--out", required=True, help="directory for the dense student (must not exist)")
    p.add_argument("--method", required=True, help="expert scoring: " + " ".join(names("score")))
    p.add_argument("--experts", type=int, required=True, help="K experts kept per layer (k <= K <= E)")
    p.add_argument("--group", default="output", help=" ".join(names("grouping")) + " (K > k)")
    p.add_argument("--blocks", type=int, default=None, help="dense blocks per layer (default: the router's top-k)")
    p.add_argument("--align", action="store_true", help="align neurons before merging a group")
    p.add_argument("--scaling", default="uniform", help=" | ".join(names("scaling")))
    p.add_argument("--data", default=None, help="calibration text: .jsonl (text field), .txt, .parquet, or a dir; "
                   "default: the offline demo corpus")
    p.add_argument("--text-column", default="text")
    p.add_argument("--calibration-tokens", type=int, default=131_072)
    p.add_argument("--seq-len", type=int, default=None, help="default: min(2048, the teacher's context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="teacher dtype during calibration")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--offload", default="auto", help="auto | layer | none: the teacher during calibration whole "
                   "(none), one decoder layer at a time (layer), or whichever fits (auto)")
    p.add_argument("--student-dtype", default="auto", help="auto (the teacher's) | float32 | bfloat16 | float16")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


COMMANDS = {
    "check-params": (check_params, "validate params.yaml without running anything"),
    "summary": (summary, "print the headline metrics of the last run"),
    "convert": (convert, "convert an MoE checkpoint into a dense one in one go"),
    "compare": (compare, "tabulate metrics across git branches or revisions (dvc exp show)"),
    "methods": (methods, "list the scoring, grouping, scaling and loss methods (the method table)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe2dense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == "check-params":
            p.add_argument("params", nargs="?", default="params.yaml")
            p.add_argument("--params", dest="params_opt", metavar="PATH", help="the params file (default params.yaml)")
            p.add_argument("--stamp", metavar="FILE", help="on success, write a constant marker file (DVC stage check)")
            p.add_argument("--passes", metavar="FILE", help="on success, write the calibration passes as JSON")
        if name == "summary":
            p.add_argument("--metrics", default="metrics")
        if name == "convert":
            _convert_args(p)
        if name == "compare":
            p.add_argument("revs", nargs="*", help="git branches, tags or commits (default: every branch)")
            p.add_argument("--experiments", action="store_true", help="also the DVC experiments on each")
            p.add_argument("--repo", default=".")
            p.add_argument("--out", help="also write the markdown table here, e.g. reports/compare.md")
        if name == "methods":
            p.add_argument("kind", nargs="*", help="score, grouping, scaling or loss (default: all)")
            p.add_argument("--readme", metavar="FILE", help="rewrite the generated method tables in FILE")
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0](args)


if __name__ == "__main__":
    sys.exit(main())
