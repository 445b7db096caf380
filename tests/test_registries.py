"""The import-time registration decorators of scoring, grouping and the distillation losses, called directly.

The real registries are filled once at import (and mutation testing forks its workers after that), so a wrong
decorator would only show here: each test swaps in a fresh, empty registry (monkeypatch restores the real one) and
checks exactly what one registration stores, that it returns the function itself, and the one-line errors.
"""
from __future__ import annotations

import pytest

from moe2dense import grouping, methods, scoring
from moe2dense.distill import losses


def _fn(*args, **kwargs):
    return None


# ------------------------------------------------------------------------------------------------------- scoring
def test_register_score_stores_the_tables_capture_and_the_fields_it_reads(monkeypatch):
    monkeypatch.setattr(scoring, "SCORERS", {})
    assert scoring.register_score("sf")(_fn) is _fn
    # default inputs: every field the method's calibration pass fills
    assert scoring.register_score("reap")(_fn) is _fn
    assert scoring.register_score("do_acp")(_fn) is _fn
    # explicit inputs win over the pass's fields
    assert scoring.register_score("acp", inputs=("sqnorm_sum_all",))(_fn) is _fn
    assert scoring.SCORERS == {
        "sf": scoring.Scorer("sf", "routing", (), _fn),
        "reap": scoring.Scorer("reap", "routed_outputs", ("norm_sum_routed", "gnorm_sum_routed"), _fn),
        "do_acp": scoring.Scorer("do_acp", "all_outputs", ("norm_sum_all", "sqnorm_sum_all", "gram"), _fn),
        "acp": scoring.Scorer("acp", "all_outputs", ("sqnorm_sum_all",), _fn),
    }


def test_register_score_refuses_a_second_registration_and_an_unknown_name(monkeypatch):
    monkeypatch.setattr(scoring, "SCORERS", {})
    scoring.register_score("pp")(_fn)
    with pytest.raises(ValueError, match="^score method 'pp' is already registered$"):
        scoring.register_score("pp")(_fn)
    with pytest.raises(ValueError, match="^'nope' is not a known score method; choose one of sf, pp, cp, ean, reap, "
                                         "acp, do_acp$"):
        scoring.register_score("nope")


def test_the_real_score_registry_matches_the_table():
    assert tuple(scoring.SCORERS) == methods.names("score") == scoring.METHODS
    assert scoring.SCORERS["ean"].inputs == ("norm_sum_routed",) and scoring.SCORERS["ean"].needs == "routed_outputs"
    assert scoring.SCORERS["do_acp"].inputs == ("sqnorm_sum_all", "gram")
    assert scoring.SCORERS["cp"].fn is scoring.conditional_probability


# ------------------------------------------------------------------------------------------------------ grouping
def test_register_grouping_stores_the_tables_input_and_clustering(monkeypatch):
    monkeypatch.setattr(grouping, "GROUPERS", {})
    assert grouping.register_grouping("weight")(_fn) is _fn
    assert grouping.register_grouping("dominant")(_fn) is _fn
    assert grouping.register_grouping("coactivation")(_fn) is _fn
    assert grouping.GROUPERS == {
        "weight": grouping.Grouper("weight", "expert_weights", "average_linkage", _fn),
        "dominant": grouping.Grouper("dominant", "gram", "centres", _fn),
        "coactivation": grouping.Grouper("coactivation", "coselect", "average_linkage", _fn),
    }


def test_register_grouping_refuses_a_second_registration_and_an_unknown_name(monkeypatch):
    monkeypatch.setattr(grouping, "GROUPERS", {})
    grouping.register_grouping("router")(_fn)
    with pytest.raises(ValueError, match="^grouping method 'router' is already registered$"):
        grouping.register_grouping("router")(_fn)
    with pytest.raises(ValueError, match="^'nope' is not a known grouping method; choose one of weight, output, "
                                         "router, dominant, coactivation$"):
        grouping.register_grouping("nope")


def test_required_input_and_unknown_grouping():
    assert [grouping.required_input(m) for m in grouping.GROUP_METHODS] == [
        "expert_weights", "gram", "router_weight", "gram", "coselect"]
    with pytest.raises(ValueError, match="^'nope' is not a known grouping method; choose one of weight, output"):
        grouping.required_input("nope")


# -------------------------------------------------------------------------------------------------------- losses
def test_register_loss_stores_the_tables_options_model(monkeypatch):
    monkeypatch.setattr(losses, "LOSSES", {})
    assert losses.register_loss("forward_kl")(_fn) is _fn
    assert losses.register_loss("jsd")(_fn) is _fn
    assert losses.register_loss("akl")(_fn) is _fn
    assert losses.LOSSES == {
        "forward_kl": losses.Loss("forward_kl", _fn, methods.Options),
        "jsd": losses.Loss("jsd", _fn, methods.JsdOptions),
        "akl": losses.Loss("akl", _fn, methods.AklOptions),
    }


def test_register_loss_refuses_a_second_registration_and_an_unknown_name(monkeypatch):
    monkeypatch.setattr(losses, "LOSSES", {})
    losses.register_loss("tv")(_fn)
    with pytest.raises(ValueError, match="^distillation loss 'tv' is already registered$"):
        losses.register_loss("tv")(_fn)
    with pytest.raises(ValueError, match="^'nope' is not a known loss method; choose one of forward_kl, reverse_kl, "
                                         "jsd, skew_forward_kl, skew_reverse_kl, akl, tv$"):
        losses.register_loss("nope")


def test_get_loss_binds_defaults_and_given_options(monkeypatch):
    seen = []

    def record(log_p, log_q, beta):
        seen.append((log_p, log_q, beta))
        return "value"

    monkeypatch.setitem(losses.LOSSES, "jsd", losses.Loss("jsd", record, methods.JsdOptions))
    assert losses.get_loss("jsd")("p", "q") == "value"
    assert losses.get_loss("jsd", {"beta": 0.25})("p2", "q2") == "value"
    assert seen == [("p", "q", 0.5), ("p2", "q2", 0.25)]
    with pytest.raises(ValueError, match="^'nope' is not a known loss method"):
        losses.get_loss("nope")


# ------------------------------------------------------------------------------------------------- MLP writers
def test_register_mlp_writer_stores_the_writer(monkeypatch):
    from moe2dense import assemble

    monkeypatch.setattr(assemble, "MLP_WRITERS", {})
    assert assemble.register_mlp_writer("mlp")(_fn) is _fn and assemble.MLP_WRITERS == {"mlp": _fn}


def test_the_real_mlp_writers():
    from moe2dense import assemble

    assert assemble.MLP_WRITERS["mlp"] is assemble._plain_mlp
    assert assemble.MLP_WRITERS["single_expert"] is assemble._single_expert
