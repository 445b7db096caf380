"""params.yaml validation: every error names the dotted key, what was given and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from moe2dense.params import ParamsError, load_params, parse_params
from conftest import REPO


def errors_for(data: dict) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(data, "params.yaml")
    return str(info.value)


def test_repo_params_and_smoke_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.teacher.source == "demo" and p.teacher.demo.num_experts >= 32
    smoke = load_params(REPO / "tests" / "smoke_params.yaml")
    assert smoke.teacher.demo.num_experts_per_tok >= 4 and smoke.teacher.demo.num_hidden_layers >= 4


def test_params_yaml_holds_exactly_the_models_defaults():
    """One set of defaults: deleting any key of params.yaml must not change the run."""
    from moe2dense.params import Params, read_yaml

    data = read_yaml((REPO / "params.yaml").read_text())
    assert load_params(REPO / "params.yaml") == Params()

    def keys(d, prefix=""):  # every leaf key of params.yaml, dotted
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in ("num_fewshot", "loss_options"):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    # and every key is written out (corpus entries aside): a user reads each default in params.yaml
    assert set(keys(Params().model_dump(mode="json"))) == set(keys(data))


def test_method_options_are_typed_by_the_method_table():
    msg = errors_for({"score": {"options": {"do_acp": {"lam": 0}, "sf": {}}}})
    assert "score.options.do_acp.lam: Input should be greater than 0 (got 0)" in msg
    assert "score.options.sf: unknown key; allowed keys here: do_acp" in msg
    msg = errors_for({"distill": {"loss": "jsd", "loss_options": {"alpha": 0.1, "beta": 1.5}}})
    assert "distill.loss_options: loss 'jsd' has no option(s) ['alpha']; allowed: ['beta']" in msg
    assert "jsd beta: Input should be less than 1 (got 1.5)" in msg
    p = parse_params({"distill": {"loss": "akl", "loss_options": {"mu": 1}}, "score": {"options": {"do_acp": {"lam": 0.5}}}})
    assert p.distill.loss_kwargs() == {"mu": 1.0} and p.score.kwargs("do_acp") == {"lam": 0.5}
    assert parse_params({}).distill.loss_kwargs() == {} and p.score.kwargs("sf") == {}


def test_unknown_top_level_section_lists_allowed_sections():
    msg = errors_for({"prepair": {}})
    assert "prepair: unknown key; allowed keys here: assemble, baselines, calibrate, distill, evaluate, group, prepare, score, screen, select, teacher" in msg


def test_unknown_nested_key_lists_allowed_keys():
    msg = errors_for({"teacher": {"demo": {"hidden": 64}}})
    assert "teacher.demo.hidden: unknown key" in msg
    assert "hidden_size" in msg and "num_experts" in msg


def test_wrong_type_names_key_and_value():
    msg = errors_for({"teacher": {"train": {"batch_size": "sixteen"}}})
    assert "teacher.train.batch_size" in msg and "'sixteen'" in msg and "integer" in msg


def test_out_of_range_value_names_bound():
    msg = errors_for({"teacher": {"demo": {"num_experts": 8}}})
    assert "teacher.demo.num_experts" in msg and "greater than or equal to 32" in msg and "(got 8)" in msg


def test_cross_field_check():
    msg = errors_for({"teacher": {"demo": {"hidden_size": 130}}})
    assert "hidden_size (130) must be divisible by num_attention_heads (4)" in msg


def test_unknown_corpus_kind_lists_kinds():
    msg = errors_for({"prepare": {"corpus": [{"kind": "shakespeare"}]}})
    assert "prepare.corpus[0]" in msg and "'shakespeare'" in msg
    assert "bible, python_docs, python_code, files, hf_dataset" in msg


def test_corpus_source_key_error_path_skips_union_tag():
    msg = errors_for({"prepare": {"corpus": [{"kind": "bible", "max_chars": -1}]}})
    assert "prepare.corpus[0].max_chars" in msg and "(got -1)" in msg


def test_all_errors_reported_at_once():
    msg = errors_for({"prepare": {"seq_len": 2}, "teacher": {"train": {"lr": 0}}})
    assert "2 invalid parameter(s)" in msg and "prepare.seq_len" in msg and "teacher.train.lr" in msg


def test_split_must_leave_training_data():
    msg = errors_for({"prepare": {"split": {"calibration": 0.5, "eval": 0.45}}})
    assert "prepare.split" in msg and "calibration + eval < 0.9" in msg


def test_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="must be a mapping"):
        load_params(bad)


def test_check_params_cli(tmp_path, capsys):
    from moe2dense.__main__ import main

    good = tmp_path / "good.yaml"
    good.write_text((REPO / "params.yaml").read_text())
    assert main(["check-params", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {source: demo, sead: 1}\n")
    assert main(["check-params", str(bad)]) == 2
    assert "teacher.sead: unknown key" in capsys.readouterr().err


def test_group_blocks_cannot_exceed_kept_experts():
    with pytest.raises(ParamsError) as err:
        parse_params({"select": {"experts": 4}, "group": {"k": 6}}, "params.yaml")
    assert "group.k = 6 must be <= select.experts = 4" in str(err.value)


@pytest.mark.parametrize("section, key, value, needle", [
    ("group", "method", "kmeans", "group.method"),
    ("group", "scaling", "big", "group.scaling"),
    ("score", "method", "top", "score.method"),
    ("distill", "loss", "mse", "distill.loss"),
    ("distill", "freeze", ["mlp"], "distill.freeze[0]"),
    ("distill", "teacher_logits", "disk", "distill.teacher_logits"),
    ("evaluate", "device", "tpu", "evaluate.device"),
    ("evaluate", "dtype", "int8", "evaluate.dtype"),
])
def test_new_sections_name_the_bad_key(section, key, value, needle):
    with pytest.raises(ParamsError) as err:
        parse_params({section: {key: value}}, "params.yaml")
    assert needle in str(err.value) and repr(value if not isinstance(value, list) else value[0]) in str(err.value)


def test_evaluate_section_errors_name_the_key():
    assert "evaluate.tasks" in errors_for({"evaluate": {"tasks": []}})
    assert "evaluate.continuation.distractors" in errors_for({"evaluate": {"continuation": {"distractors": 0}}})
    assert "shots must be >= 0" in errors_for({"evaluate": {"num_fewshot": {"hellaswag": -1}}})
    assert "evaluate.max_length" in errors_for({"evaluate": {"max_length": 4}})
