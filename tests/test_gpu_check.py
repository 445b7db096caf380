"""bench/gpu_check.py: its CPU dry run (the same code as on a GPU, tiny shapes, gloo) passes every check from any
working directory, and a failing check is reported, not raised."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import torch

from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"
CHECKS = ["build models", "calibrate whole", "calibrate layer", "distill fsdp", "distill ddp", "teacher_logits",
          "lm-eval", "time budget"]


def _table(out: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}  # rows[0]: the header


def test_dry_run_passes_every_check_from_another_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = _table(proc.stdout)
    assert list(table) == CHECKS
    assert all(cells[0] == "PASS" for cells in table.values()), proc.stdout
    for name in ("calibrate whole", "distill fsdp", "distill ddp", "teacher_logits"):
        assert float(table[name][1].replace(",", "")) > 0  # tokens/s
    assert table["distill fsdp"][4] != "-"  # the memory plan's estimate
    assert table["distill fsdp"][2] == "-"  # no MFU on a CPU (no known peak)
    assert list(tmp_path.iterdir()) == []  # everything it wrote was in its temp dir


def test_a_failing_check_is_a_fail_row(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)

    def broken(env):
        raise RuntimeError("CUDA out of memory\nmore detail")

    env = gpu_check.Env(device=torch.device("cpu"), shape=gpu_check.SHAPES["dry"], root=REPO,
                        teacher_dir=REPO, student_dir=REPO, rows=None, peak=None)
    r = gpu_check.run_check(env, "x", broken)
    assert (r.check, r.ok, r.note) == ("x", False, "RuntimeError: CUDA out of memory")
    assert "| x | FAIL |" in gpu_check.report([r], "cpu")
