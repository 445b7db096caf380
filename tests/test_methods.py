"""The method table (moe2dense/methods.py): the params Literals, the registries, the capture rule and the README's
method tables all derive from it."""
from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from conftest import REPO
from moe2dense import methods as M
from moe2dense import params as P


def test_registries_and_params_literals_are_the_table():
    from moe2dense.distill.losses import LOSSES
    from moe2dense.grouping import GROUPERS
    from moe2dense.scaling import SCALINGS
    from moe2dense.scoring import SCORERS

    assert M.names("score") == ("sf", "pp", "cp", "ean", "reap", "acp", "do_acp")
    for kind, registry, literal in (("score", SCORERS, P.ScoreMethod), ("grouping", GROUPERS, P.GroupMethod),
                                    ("scaling", SCALINGS, P.Scaling), ("loss", LOSSES, P.DistillLoss)):
        assert tuple(registry) == M.names(kind) == typing.get_args(literal), kind
    assert {n: (g.needs, g.clustering) for n, g in GROUPERS.items()} == {
        m.name: (m.reads, m.clustering) for m in M.TABLE if m.kind == "grouping"}
    assert {n: s.needs for n, s in SCORERS.items()} == {m.name: m.capture for m in M.TABLE if m.kind == "score"}


def test_table_defaults_feed_params_defaults():
    p = P.Params()
    assert p.score.methods == list(M.names("score")) and p.screen.groupings == list(M.names("grouping"))
    assert p.score.options.do_acp == M.DoAcpOptions() and M.DoAcpOptions().lam == 1e-3


def test_a_registry_out_of_step_with_the_table_fails_loudly():
    from moe2dense.scoring import register_score

    with pytest.raises(ValueError, match="'my_score' is not a known score method; choose one of sf, pp"):
        register_score("my_score")
    with pytest.raises(AssertionError, match="loss registry"):
        M.check_registry("loss", ["forward_kl"])


@pytest.mark.parametrize("scores, groups, passes", [
    (["sf", "pp", "cp"], [], {"routing"}),
    (["reap", "ean"], ["coactivation"], {"routing", "routed_outputs"}),
    (["sf"], ["weight", "router"], {"routing"}),  # read from the teacher's weights
    (["sf"], ["output"], {"routing", "all_outputs"}),  # the Gram matrix
    (["do_acp"], [], {"routing", "all_outputs"}),
    (list(M.names("score")), [], {"routing", "routed_outputs", "all_outputs"}),
])
def test_capture_passes(scores, groups, passes):
    assert M.capture_passes(scores, groups) == passes


def test_merge_by_and_options():
    assert M.get("score", "do_acp").merge_score == "acp" and M.get("score", "reap").merge_score == "reap"
    assert M.options("loss", "jsd", {"beta": 0.25}).model_dump() == {"beta": 0.25}
    assert M.options("loss", "akl").model_dump() == {"mu": 0.5}
    with pytest.raises(ValueError, match=r"loss 'tv' has no option\(s\) \['mu'\]; allowed: \[\]"):
        M.options("loss", "tv", {"mu": 0.5})
    with pytest.raises(ValueError, match=r"akl mu: Input should be greater than 0 \(got 0\)"):
        M.options("loss", "akl", {"mu": 0})
    with pytest.raises(ValueError, match="not a known grouping method; choose one of weight, output"):
        M.get("grouping", "kmeans")


def test_readme_method_tables_are_generated_from_the_table():
    text = (REPO / "README.md").read_text()
    for kind in M.KINDS:
        assert M.markdown(kind) in text, \
            f"README's {kind} table is stale: python -m moe2dense methods --readme README.md"
    assert M.update_readme(text) == text
    assert "| `do_acp` |" in M.markdown("score") and "`lam` (0.001)" in M.markdown("score")


def test_methods_command_from_another_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moe2dense", "methods", "loss"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("| `distill.loss` |") and "| `jsd` |" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "moe2dense", "methods", "losses"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown kind(s) ['losses']" in bad.stderr


def test_dvc_yaml_coverage_plot_lists_every_scoring_method():
    """dvc.yaml cannot import the table: the selection-coverage plot's columns are kept in step here."""
    import yaml

    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    coverage = next(p["plots/selection_coverage.csv"] for p in plots if "plots/selection_coverage.csv" in p)
    assert tuple(coverage["y"]) == M.names("score")
