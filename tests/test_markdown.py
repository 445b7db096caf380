"""moe2dense.markdown, the one table renderer, and the model card built on it: exact text, written out by hand."""

from __future__ import annotations

from pathlib import Path

from moe2dense.markdown import render, table


def test_table_lines_are_unpadded_with_the_alignment_rule():
    assert table(["model", "loss"], [["teacher", 1.5], ["student", 12]], "lr") == [
        "| model | loss |",
        "|---|---:|",
        "| teacher | 1.5 |",
        "| student | 12 |",
    ]


def test_align_shorter_than_the_header_keeps_the_default_alignment():
    assert table(["a", "b", "c"], [], "r") == ["| a | b | c |", "|---:|---|---|"]
    assert table(["a", "b"], [], "xr") == ["| a | b |", "|---|---:|"]  # any letter but r: default


def test_empty_cells_render_as_one_space_so_a_headerless_table_is_valid():
    # the model card's two-column key/value table has an empty header
    assert render(["", ""], [["dtype", "float32"], ["note", ""]]) == (
        "| | |\n"
        "|---|---|\n"
        "| dtype | float32 |\n"
        "| note | |\n"
    )


def test_render_is_the_lines_joined_with_a_final_newline():
    rows = [[None, 0], ["x", "—"]]
    assert render(["k", "v"], rows, "lr") == "| k | v |\n|---|---:|\n| None | 0 |\n| x | — |\n"
    assert render(["k", "v"], iter(rows), "lr") == "\n".join(table(["k", "v"], rows, "lr")) + "\n"  # any iterable


def test_model_card_table_and_provenance():
    from moe2dense.assemble import VERSION, model_card

    plan = {"teacher": {"model_type": "qwen3_moe", "num_experts": 32, "top_k": 4, "moe_layers": [0, 1]},
            "score_method": "do_acp", "merge_scores": "acp", "experts_per_layer": 8, "blocks_per_layer": 4,
            "pure_pruning": False, "group_method": "router", "align": True, "scaling": "score",
            "layers": {"0": {"groups": [{"experts": [3, 5], "scale": 0.123456}]}}}
    summary = {"model_type": "qwen3", "num_parameters": 1_639_808, "dtype": "float32", "intermediate_size": 256}
    card = model_card(plan, summary, Path("models/teacher"), single_expert=False)
    assert (f"Made by moe2dense {VERSION} from the teacher at `models/teacher` (qwen3_moe, 32 experts per layer, "
            "top-4, 2 MoE layers).\n\n"
            "| | |\n"
            "|---|---|\n"
            "| parameters | 1,639,808 |\n"
            "| dtype | float32 |\n"
            "| MLP width | 256 |\n"
            "| expert scoring | do_acp (merge weights by acp) |\n"
            "| experts kept per layer (K) | 8 |\n"
            "| dense blocks per layer (k) | 4 |\n"
            "| grouping | router + neuron alignment |\n"
            "| magnitude scaling | score |\n"
            "\n## How it was made\n") in card
    assert "http" not in card  # no link that could go dead
    pure = model_card(plan | {"pure_pruning": True, "group_method": None, "align": False}, summary,
                      Path("models/teacher"), single_expert=False)
    assert "| grouping | none (pure pruning, K == k) |\n" in pure


def test_architecture_doc_stage_table_is_dvc_yaml():
    """docs/architecture.md's data-flow table is a checked copy of dvc.yaml (data deps, params, outputs): a stage
    edited in one and not the other fails here, naming the stage and the difference."""
    import re

    import yaml

    repo = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    doc = (repo / "docs" / "architecture.md").read_text()
    header = "| stage | reads (data deps) | params | writes |"
    assert header in doc
    rows = doc.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]  # skip the rule line
    ticks = lambda cell: {t.rstrip("/") for t in re.findall(r"`([^`]+)`", cell)}  # noqa: E731
    table = {}
    for row in rows:
        name, reads, params, writes = [c.strip() for c in row.strip("|").split("|")]
        table[name.strip("`").split("@")[0]] = (ticks(reads), ticks(params), ticks(writes))
    assert set(table) == set(stages)
    templates = {"${item.model}": "<model>", "${item.baseline}": "<baseline>", "${key}": "<baseline>",
                 "${item}": "<teacher>"}

    def path(p):
        p = next(iter(p)) if isinstance(p, dict) else p
        for template, shown in templates.items():
            p = p.replace(template, shown)
        return p

    for name, s in stages.items():
        s = s.get("do", s)  # foreach: the stage body
        deps = {path(d) for d in s.get("deps", []) if not d.startswith(("stages/", "moe2dense/"))}  # code deps aside
        outs = {path(o) for key in ("outs", "metrics", "plots") for o in s.get(key, [])}
        assert table[name] == (deps, set(s.get("params", [])), outs), name
