"""The mutation score per module after `mutmut run` (`make mutate`): killed / (killed + survived) for every module of
[tool.mutmut] source_paths, plus the mutants no test reaches, and the survivors by name (`mutmut show NAME` shows
the change). Statuses are mutmut's own (`mutmut.stats.status_by_exit_code`); results come from mutants/*.meta.

    python tests/mutation_report.py [--mutants mutants] [--survivors]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {"killed", "timeout", "segfault", "caught by type check"}  # a test or the runtime noticed the change


def statuses(mutants: Path) -> dict[str, dict[str, str]]:
    """module file -> mutant name -> status, from mutmut's .meta files."""
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = meta.relative_to(mutants).as_posix()[: -len(".meta")]
        out[module] = {k: status_by_exit_code[v] for k, v in codes.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", action="store_true", help="list every surviving mutant by name")
    args = parser.parse_args(argv)
    if not args.mutants.is_dir():
        print(f"error: {args.mutants} not found: run `make mutate` (or `mutmut run`) first", file=sys.stderr)
        return 2
    by_module = statuses(args.mutants)
    print("| module | mutants | killed | survived | no tests | score |")
    print("|---|---:|---:|---:|---:|---:|")
    for module, st in by_module.items():
        n = Counter("killed" if s in KILLED else s for s in st.values())
        tested = n["killed"] + n["survived"]
        score = f"{100 * n['killed'] / tested:.1f}%" if tested else "-"
        print(f"| {module} | {len(st)} | {n['killed']} | {n['survived']} | {n['no tests']} | {score} |")
        if n["not checked"]:
            print(f"|   ({n['not checked']} not checked: the run is unfinished or was interrupted) | | | | | |")
    if args.survivors:
        for module, st in by_module.items():
            for name in sorted(k for k, s in st.items() if s == "survived"):
                print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
