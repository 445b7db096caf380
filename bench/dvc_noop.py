"""Wall time of a no-op `dvc repro` on a finished pipeline (budget: <= 3 s), next to `dvc status` and a bare
`python -c pass` start-up measured in the same run.

    python bench/dvc_noop.py [--repo .] [--rounds 5]
Run it after `make demo` (every stage up to date)."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], cwd: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - start, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=".")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cmds = {"python -c pass": [sys.executable, "-c", "pass"],
            "dvc status": [sys.executable, "-m", "dvc", "status"],
            "dvc repro (no-op)": [sys.executable, "-m", "dvc", "repro"]}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.rounds):
        for name, cmd in cmds.items():
            seconds, out = wall(cmd, args.repo)
            if name.startswith("dvc repro") and "Running stage" in out:
                sys.exit("the pipeline was not up to date: a stage ran; run `dvc repro` once first, then this bench")
            times[name].append(seconds)
    for name, ts in times.items():
        print(f"{name:>20}: median {statistics.median(ts):.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})")
    noop = statistics.median(times["dvc repro (no-op)"])
    print(f"no-op dvc repro {noop:.2f} s against the 3 s budget: {'PASS' if noop <= 3 else 'FAIL'}; "
          f"{noop / statistics.median(times['python -c pass']):.1f}x a bare interpreter start")


if __name__ == "__main__":
    main()
