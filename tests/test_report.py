"""The report's tables, figure and summary from hand-made eval results (expected values computed by hand), and
the `report` stage end to end in a temp dir."""
from __future__ import annotations

import io
import json
import shutil

import polars as pl
import pytest
from PIL import Image

from conftest import REPO
from moe2dense.report import (eval_bars_png, fmt, long_table, merge_eval, mib, plot_rows, recovered,
                              recovery_cell, render_summary, significant)


def model(path, params, weight_bytes, model_type, acc, acc_norm, ami, bpb, word_ppl, acc_norm_err=0.04):
    cont = {"acc": acc, "acc_stderr": 0.05, "acc_norm": acc_norm, "acc_mutual_info": ami, "samples": 100}
    if acc_norm_err is not None:
        cont["acc_norm_stderr"] = acc_norm_err
    return {"path": path, "size": {"parameters": params, "weight_bytes": weight_bytes, "dtype": "float32",
                                   "model_type": model_type},
            "demo_continuation": cont,
            "demo_ppl_bible": {"word_perplexity": word_ppl, "byte_perplexity": 2.0 ** bpb, "bits_per_byte": bpb,
                               "samples": 7}}


def per_model() -> dict[str, dict]:
    return {  # given out of order on purpose
        "distilled": model("models/distilled", 1_000_000, 3_670_016, "qwen3", 0.45, 0.4, 0.3, 1.5, 300.0),
        "teacher": model("models/teacher", 4_000_000, 16 * 2**20, "qwen3_moe", 0.5, 0.6, 0.25, 1.0, 12_345_678.0),
        "student": model("models/student", 1_000_000, 3_670_016, "qwen3", 0.3, 0.4, 0.25, 2.0, 2e7,
                         acc_norm_err=None),
    }


@pytest.fixture
def results() -> dict:
    return merge_eval(per_model())


def test_merge_eval_orders_models_and_rejects_unknown(results):
    assert list(results) == ["teacher", "student", "distilled"]
    assert results["teacher"]["path"] == "models/teacher"
    with pytest.raises(ValueError, match="unknown models"):
        merge_eval({"teacher": {}, "moe": {}})
    with pytest.raises(ValueError):
        merge_eval({})


def test_long_table_rows(results):
    df = long_table(results)
    assert df.columns == ["model", "task", "metric", "value", "stderr"]
    assert df.height == 3 * (3 + 3)  # samples and *_stderr are not rows
    assert "samples" not in df["metric"].to_list()
    assert df.filter(pl.col("model") == "teacher").rows() == [
        ("teacher", "demo_continuation", "acc", 0.5, 0.05),
        ("teacher", "demo_continuation", "acc_mutual_info", 0.25, None),
        ("teacher", "demo_continuation", "acc_norm", 0.6, 0.04),
        ("teacher", "demo_ppl_bible", "bits_per_byte", 1.0, None),
        ("teacher", "demo_ppl_bible", "byte_perplexity", 2.0, None),
        ("teacher", "demo_ppl_bible", "word_perplexity", 12_345_678.0, None),
    ]
    assert df.filter((pl.col("model") == "student") & (pl.col("metric") == "acc_norm"))["stderr"].to_list() == [None]


def test_plot_rows(results):
    acc, bpb = plot_rows(results)
    assert acc.columns == bpb.columns == ["label", "model", "value"]
    assert acc.rows() == [
        ("teacher: demo_continuation acc", "teacher", 0.5), ("student: demo_continuation acc", "student", 0.3),
        ("distilled: demo_continuation acc", "distilled", 0.45),
        ("teacher: demo_continuation acc_norm", "teacher", 0.6), ("student: demo_continuation acc_norm", "student", 0.4),
        ("distilled: demo_continuation acc_norm", "distilled", 0.4),
        ("teacher: demo_continuation acc_mutual_info", "teacher", 0.25), ("student: demo_continuation acc_mutual_info", "student", 0.25),
        ("distilled: demo_continuation acc_mutual_info", "distilled", 0.3),
    ]
    assert bpb.rows() == [("teacher: demo_ppl_bible", "teacher", 1.0), ("student: demo_ppl_bible", "student", 2.0),
                          ("distilled: demo_ppl_bible", "distilled", 1.5)]


def test_number_formatting_and_recovery():
    assert fmt(0.1875) == "0.1875"
    assert fmt(603.24) == "603.2" and fmt(1604.9) == "1605"
    assert fmt(2.0) == "2.000"
    assert fmt(12_345_678.0) == "12,345,678"
    assert fmt(None) == "—"
    assert mib(17_634_816) == "16.82"
    assert mib(3_670_016) == "3.500"
    assert recovered(0.5, 0.3, 0.45) == pytest.approx(0.75)
    assert recovered(1.0, 2.0, 1.5) == pytest.approx(0.5)  # lower is better: same formula, still positive
    assert recovered(1.0, 2.0, 2.5) == pytest.approx(-0.5)  # distillation made it worse
    assert recovered(0.25, 0.25, 0.3) is None  # no gap to recover
    assert recovered(0.5, None, 0.4) is None


def test_significance_uses_two_combined_standard_errors():
    # sqrt(0.03^2 + 0.04^2) = 0.05, so differences from 0.10 on are significant
    assert significant((0.50, 0.03), (0.39, 0.04)) is True  # 0.11
    assert significant((0.39, 0.04), (0.50, 0.03)) is True  # either order
    assert significant((0.50, 0.03), (0.41, 0.04)) is False  # 0.09
    assert significant((1.0, None), (2.0, 0.1)) is None  # no stderr: nothing to test
    assert significant((None, 0.1), (2.0, 0.1)) is None


def test_recovery_is_only_a_percentage_outside_the_noise():
    # The demo's old figures, each +- 0.035: the gap 0.401 - 0.313 = 0.088 is under 2 * sqrt(2) * 0.035 = 0.0990,
    # so not (0.417 - 0.313) / 0.088 = 118.2%.
    assert recovery_cell((0.401, 0.035), (0.313, 0.035), (0.417, 0.035)) == "not significant"
    # gap 0.2 and change 0.15 both >= 2 * sqrt(2) * 0.05 = 0.1414: (0.45 - 0.3) / 0.2
    assert recovery_cell((0.5, 0.05), (0.3, 0.05), (0.45, 0.05)) == "75.0%"
    # a real gap, but distillation moved the student by 0.05 < 0.1414
    assert recovery_cell((0.5, 0.05), (0.3, 0.05), (0.35, 0.05)) == "not significant"
    assert recovery_cell((0.5, 0.05), (0.3, 0.05), (0.15, 0.05)) == "-75.0%"  # significantly worse
    assert recovery_cell((1.0, None), (2.0, None), (1.5, None)) == "50.0%"  # no stderr (perplexity): untested
    assert recovery_cell((0.25, 0.01), (0.25, 0.01), (0.3, 0.01)) == "—"  # no gap


def test_summary_marks_noise_as_not_significant():
    three = per_model()
    three["distilled"]["demo_continuation"]["acc"] = 0.35  # 0.05 above the student, 2 SE = 0.1414
    md = render_summary(merge_eval(three), metrics={}, params={}, figures=[])
    assert ("| demo_continuation | acc ↑ | 0.5000 ± 0.05000 | 0.3000 ± 0.05000 | 0.3500 ± 0.05000 | "
            "not significant |") in md
    assert "smaller than 2 standard errors" in md


def test_summary_tables(results):
    md = render_summary(results, metrics={"assemble": {"model_type": "qwen3", "num_parameters": 1_000_000,
                                                       "teacher_parameters": 4_000_000},
                                          "distill": {"loss": "forward_kl", "tokens": 198_656, "steps": 97,
                                                      "heldout_kl_before": 0.8, "heldout_kl_after": 0.2}},
                        params={"prepare": {"seed": 0}, "select": {"experts": 4}, "distill": {"tokens": 198_656}},
                        figures=["eval.png", "../plots/selection_heatmap.png"])
    assert "| model | model_type | parameters | % of teacher | weights (MiB) | dtype |\n|---|---|---:|---:|---:|---|\n" \
        in md
    assert "| teacher | qwen3_moe | 4,000,000 | 100.00% | 16.00 | float32 |" in md
    assert "| student | qwen3 | 1,000,000 | 25.00% | 3.500 | float32 |" in md
    assert "| task | metric | teacher | student | distilled | distillation recovers |\n|---|---|---:|---:|---:|---:|\n" \
        in md
    assert ("| demo_continuation | acc ↑ | 0.5000 ± 0.05000 | 0.3000 ± 0.05000 | 0.4500 ± 0.05000 | 75.0% |"
            in md)
    assert "| demo_continuation | acc_norm ↑ | 0.6000 ± 0.04000 | 0.4000 | 0.4000 ± 0.04000 | 0.0% |" in md
    assert "| demo_continuation | acc_mutual_info ↑ | 0.2500 | 0.2500 | 0.3000 | — |" in md
    assert "| demo_ppl_bible | bits_per_byte ↓ | 1.000 | 2.000 | 1.500 | 50.0% |" in md
    assert "| demo_ppl_bible | word_perplexity ↓ | 12,345,678 | 20,000,000 | 300.0 |" in md
    assert "byte_perplexity" not in md  # redundant with bits per byte
    assert "198,656 tokens" in md and "0.8000 → 0.2000 (-75.0%)" in md
    assert "25.00% of the teacher's 4,000,000" in md
    params = md.split("## Params that produced this")[1]
    assert "select:\n  experts: 4" in params and "prepare" not in params
    assert "![eval](eval.png)" in md and "![selection_heatmap](../plots/selection_heatmap.png)" in md


def test_summary_with_teacher_and_student_only():
    two = {m: r for m, r in per_model().items() if m != "distilled"}
    two["teacher"]["winogrande"] = {"acc": 0.6, "acc_stderr": 0.01}  # a paper task only the teacher has
    results = merge_eval(two)
    md = render_summary(results, metrics={}, params={}, figures=[])
    assert "| task | metric | teacher | student |\n" in md
    assert "distillation recovers" not in md.split("## Results")[1].split("\n\n", 2)[2]  # not as a column
    assert "| winogrande | acc ↑ | 0.6000 ± 0.01000 | — |" in md
    assert "## Distillation" not in md and "## Figures" not in md and "## Params" not in md
    acc, bpb = plot_rows(results)
    assert ("teacher: winogrande acc", "teacher", 0.6) in acc.rows() and bpb.height == 2


def test_png_is_valid_and_deterministic(results, tmp_path):
    eval_bars_png(results, tmp_path / "a.png")
    eval_bars_png(results, tmp_path / "b.png")
    buf = io.BytesIO()
    eval_bars_png(results, buf)  # the stage writes through an atomic file object
    a = (tmp_path / "a.png").read_bytes()
    assert a.startswith(b"\x89PNG\r\n\x1a\n") and len(a) > 10_000
    assert a == (tmp_path / "b.png").read_bytes() == buf.getvalue()
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.width > im.height  # two task panels side by side
    with pytest.raises(ValueError, match="no tasks"):
        eval_bars_png({"teacher": {"path": "x", "size": {}}}, tmp_path / "c.png")


def write_inputs(root, models=("teacher", "student", "distilled")):
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "eval").mkdir()
    for name, result in per_model().items():
        if name in models:
            (root / "eval" / f"{name}.json").write_text(json.dumps(result))
    (root / "metrics").mkdir()
    (root / "metrics" / "assemble.json").write_text(json.dumps(
        {"model_type": "qwen3", "num_parameters": 1_000_000, "teacher_parameters": 4_000_000,
         "parameter_ratio": 0.25}))
    (root / "plots").mkdir()
    (root / "plots" / "selection_heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # only this stage figure exists


def test_stage_end_to_end(tmp_path, monkeypatch):
    from stages import report

    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    report.main()
    merged = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert list(merged) == ["distilled", "student", "teacher"]  # sorted keys on disk
    assert merged["teacher"]["demo_continuation"]["acc"] == 0.5
    acc = pl.read_csv(tmp_path / "plots/eval_accuracy.csv")
    assert acc.columns == ["label", "model", "value"] and acc.height == 9
    assert pl.read_csv(tmp_path / "plots/eval_bits_per_byte.csv").rows()[2] == ("distilled: demo_ppl_bible", "distilled", 1.5)
    with Image.open(tmp_path / "reports/eval.png") as im:
        assert im.format == "PNG"
    md = (tmp_path / "reports/summary.md").read_text()
    assert "| demo_ppl_bible | bits_per_byte ↓ | 1.000 | 2.000 | 1.500 | 50.0% |" in md
    assert "| student | qwen3 | 1,000,000 | 25.00% | 3.500 | float32 |" in md
    assert "![eval](eval.png)" in md and "(../plots/selection_heatmap.png)" in md
    assert "score_distributions" not in md  # not present, so not linked
    assert "evaluate:\n  tasks:" in md and "loss: forward_kl" in md  # params sections
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes left nothing behind


def test_stage_missing_eval_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from stages import report
    from stages._runner import run

    write_inputs(tmp_path, models=("teacher", "student"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # what `python -m stages.report` does, without a slow subprocess
        run("report", report.main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "eval/distilled.json not found" in err and "dvc repro evaluate" in err
    assert not (tmp_path / "metrics/eval.json").exists()
