"""`python -m moe2dense <command>`: small user-facing commands beside the DVC stages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe2dense.params import ParamsError, load_params


def check_params(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params)
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"{args.params}: OK ({', '.join(type(params).model_fields)})")
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
        print(f"{path.stem:>10}: " + ", ".join(f"{k}={v}" for k, v in sorted(flat.items())))
    return 0


COMMANDS = {
    "check-params": (check_params, "validate params.yaml without running anything"),
    "summary": (summary, "print the headline metrics of the last run"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe2dense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == "check-params":
            p.add_argument("params", nargs="?", default="params.yaml")
        if name == "summary":
            p.add_argument("--metrics", default="metrics")
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0](args)


if __name__ == "__main__":
    sys.exit(main())
