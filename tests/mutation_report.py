"""The mutation score per module after `mutmut run` (`make mutate`), over the non-equivalent mutants:
killed / (killed + survived + no tests - equivalent), for every module of [tool.mutmut] source_paths. A surviving
mutant is either killed by a test or listed in tests/mutation_equivalent.txt with a one-line reason (it changes
nothing a caller can observe); every other survivor is printed as unexplained. "no tests": mutants in code no selected
test reaches, counted as survivors. Statuses are mutmut's own (`mutmut.stats.status_by_exit_code`), read from
mutants/*.meta.

    python tests/mutation_report.py [--mutants mutants] [--equivalent FILE] [--screen FILE ...] [--survivors]
                                    [--goal 90]

--screen: name -> status JSON files of tests/mutation_screen.py, which take precedence over mutmut's own statuses.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {"killed", "timeout", "segfault", "caught by type check"}  # a test or the runtime noticed the change
SURVIVED = {"survived", "no tests"}  # nothing noticed the change
EQUIVALENT = Path(__file__).with_name("mutation_equivalent.txt")


def statuses(mutants: Path) -> dict[str, dict[str, str]]:
    """module file -> mutant name -> status, from mutmut's .meta files."""
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = meta.relative_to(mutants).as_posix()[: -len(".meta")]
        out[module] = {k: status_by_exit_code[v] for k, v in codes.items()}
    return out


def read_equivalent(path: Path) -> dict[str, str]:
    """mutant name -> reason, from lines `NAME  reason` (blank lines and # comments skipped)."""
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise ValueError(f"{path}:{number}: {name} has no reason (expected `NAME  reason`)")
        if name in out:
            raise ValueError(f"{path}:{number}: {name} is listed twice")
        out[name] = reason.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--equivalent", type=Path, default=EQUIVALENT, help="the explained survivors")
    parser.add_argument("--screen", type=Path, nargs="*", default=[], help="mutation_screen.py results")
    parser.add_argument("--survivors", action="store_true", help="list every unexplained survivor by name")
    parser.add_argument("--goal", type=float, default=None, help="exit 1 if a module scores below this percentage")
    args = parser.parse_args(argv)
    if not args.mutants.is_dir():
        print(f"error: {args.mutants} not found: run `make mutate` (or `mutmut run`) first", file=sys.stderr)
        return 2
    equivalent = read_equivalent(args.equivalent) if args.equivalent.is_file() else {}
    by_module = statuses(args.mutants)
    screened = {k: v for f in args.screen for k, v in json.loads(f.read_text()).items()}
    for st in by_module.values():
        st.update({k: screened[k] for k in st if k in screened})
    print("| module | mutants | killed | survived | equivalent | score |")
    print("|---|---:|---:|---:|---:|---:|")
    below, unexplained, stale = [], [], []
    for module, st in by_module.items():
        n = Counter("killed" if s in KILLED else "survived" if s in SURVIVED else s for s in st.values())
        eq = sum(1 for k, s in st.items() if s in SURVIVED and k in equivalent)
        stale += [k for k, s in st.items() if k in equivalent and s in KILLED]
        unexplained += [k for k, s in sorted(st.items()) if s in SURVIVED and k not in equivalent]
        tested = n["killed"] + n["survived"] - eq
        score = 100 * n["killed"] / tested if tested else None
        shown = "-" if score is None else f"{score:.1f}%"
        print(f"| {module} | {len(st)} | {n['killed']} | {n['survived']} | {eq} | {shown} |")
        if n["not checked"]:
            print(f"|   ({n['not checked']} not checked: the run is unfinished or was interrupted) | | | | | |")
        if args.goal is not None and (score is None or score < args.goal or n["not checked"]):
            below.append(module)
    print(f"\n{len(unexplained)} unexplained survivors; {sum(len(v) for v in by_module.values())} mutants, "
          f"{len(equivalent)} listed as equivalent in {args.equivalent.name}")
    if stale:
        print(f"{len(stale)} listed as equivalent are killed now (remove them from {args.equivalent.name}): "
              + ", ".join(stale))
    if args.survivors:
        print("\n".join(unexplained))
    if below:
        print(f"below the goal of {args.goal:g}% (or unfinished): {', '.join(below)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
