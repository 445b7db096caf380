"""The method table: every scoring method, grouping, scaling and distillation loss, with what it needs.

One entry per method, torch-free so that params validation, `check-params` and the docs import it without loading
torch. Everything else derives from it:
- the params Literals and the typed option sections (moe2dense/params.py),
- the registries, which take each method's metadata from here and only add its function (`scoring.register_score`,
  `grouping.register_grouping`, `scaling.register_scaling`, `distill.losses.register_loss`; an import-time check
  keeps registry and table equal),
- the calibration passes calibrate runs (`capture_passes`, used by the stages, the screen and `convert` alike),
- the README's method tables (`python -m moe2dense methods --readme README.md`; a test keeps them in step).

Adding a method: one `Method` entry here, one registered function, one test (docs/architecture.md, "Adding a
method"). Definitions and sources: docs/architecture.md, "Methods".
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Kind = Literal["score", "grouping", "scaling", "loss", "importance", "baseline"]
KINDS: tuple[str, ...] = ("score", "grouping", "scaling", "loss", "importance", "baseline")

#: Calibration passes, cheapest first. routing: the router hook only; routed_outputs: each expert's output on the
#: tokens routed to it (free during the normal forward); all_outputs: every expert on every token (E/k x FFN cost).
Capture = Literal["routing", "routed_outputs", "all_outputs"]
CAPTURES: tuple[str, ...] = ("routing", "routed_outputs", "all_outputs")

#: What a grouping reads for one layer (fields of grouping.GroupInputs) and the calibration pass it comes from; None:
#: read from the teacher's weights.
GroupInput = Literal["expert_weights", "gram", "router_weight", "coselect"]
INPUT_CAPTURE: dict[str, str | None] = {"expert_weights": None, "gram": "all_outputs", "router_weight": None,
                                        "coselect": "routing"}
Clustering = Literal["average_linkage", "centres"]


class Options(BaseModel):
    """A method's options (none by default). Strict like params.yaml: a bool is not a number."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DoAcpOptions(Options):
    lam: float = Field(1e-3, gt=0, description="ridge of the kernel, relative to the best expert's squared quality")


class JsdOptions(Options):
    beta: float = Field(0.5, gt=0, lt=1, description="mixing weight of the teacher in m = beta p + (1 - beta) q")


class SkewOptions(Options):
    alpha: float = Field(0.1, gt=0, lt=1, description="skew: the mixture's weight on the first distribution")


class AklOptions(Options):
    mu: float = Field(0.5, gt=0, le=1, description="share of the teacher's mass that counts as its head")


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    name: str
    summary: str  # one line: what it computes (the README's tables)
    source: str = ""  # where the definition comes from
    capture: Capture | None = None  # the calibration pass it needs beyond routing (score, grouping)
    options: type[Options] = Options
    merge_by: str | None = None  # score: the score its groups merge by, when its own is not a quality (do_acp)
    reads: GroupInput | None = None  # grouping: the input its similarity is computed from
    clustering: Clustering | None = None  # grouping: how the similarity becomes k groups

    @property
    def merge_score(self) -> str:
        """The score method a group merges by when this scoring method selected it."""
        return self.merge_by or self.name


PAPER = "Kim et al. 2026 (arXiv 2605.28207)"
_S, _G, _C, _L, _I, _B = "score", "grouping", "scaling", "loss", "importance", "baseline"
MINITRON = "Muralidharan et al. 2024 (Minitron, arXiv 2407.14679)"

TABLE: tuple[Method, ...] = (
    # ---------------------------------------------------------------- scoring: one value per expert and layer
    Method(kind=_S, name="sf", summary="selection frequency, abs(X_e) / N", source=PAPER, capture="routing"),
    Method(kind=_S, name="pp", summary="mean router probability over all tokens", source=PAPER, capture="routing"),
    Method(kind=_S, name="cp", summary="mean router probability over the tokens routed to e", source=PAPER,
           capture="routing"),
    Method(kind=_S, name="ean", summary="(1/N) sum over routed tokens of norm(f_e(x))", source=PAPER,
           capture="routed_outputs"),
    Method(kind=_S, name="reap", summary="mean over routed tokens of g · norm(f_e(x))", source=PAPER,
           capture="routed_outputs"),
    Method(kind=_S, name="acp", summary="cp · RMS of norm(f_e(x)) over all tokens (all-experts pass)",
           source=PAPER, capture="all_outputs"),
    Method(kind=_S, name="do_acp", summary="greedy MAP of log det(diag(q) C diag(q) + λI), q = acp / max(acp), "
           "C = cosine similarity of expert outputs; the score is the log-det gain when the expert joins the greedy "
           "set", source=PAPER + "; greedy MAP: Chen, Zhang & Zhou, NeurIPS 2018", capture="all_outputs",
           options=DoAcpOptions, merge_by="acp"),
    # ---------------------------------------------------------------- grouping: K selected experts -> k groups
    Method(kind=_G, name="weight", summary="cosine similarity of the flattened expert weights", source=PAPER,
           reads="expert_weights", clustering="average_linkage"),
    Method(kind=_G, name="output", summary="cosine similarity of expert outputs over calibration tokens (from the "
           "Gram matrix)", source=PAPER, reads="gram", clustering="average_linkage"),
    Method(kind=_G, name="router", summary="cosine similarity of the router rows", source=PAPER,
           reads="router_weight", clustering="average_linkage"),
    Method(kind=_G, name="dominant", summary="output similarity; the k best-scored experts are centres, every other "
           "joins its most similar centre", source=PAPER, reads="gram", clustering="centres"),
    Method(kind=_G, name="coactivation", summary="how often two experts serve the same token (cosine of their "
           "selection indicators)", source=PAPER, reads="coselect", clustering="average_linkage"),
    # ---------------------------------------------------------------- scaling: the constant c_g of each block
    Method(kind=_C, name="uniform", summary="c_g = m / k", source=PAPER),
    Method(kind=_C, name="score", summary="c_g proportional to the group's mean applied routing weight when "
           "selected, normalised to sum to m", source=PAPER),
    # ---------------------------------------------------------------- distillation losses on next-token bins
    Method(kind=_L, name="forward_kl", summary="KL(p_teacher ‖ q_student) (default)", source=PAPER),
    Method(kind=_L, name="reverse_kl", summary="KL(q ‖ p)", source="Gu et al. 2024 (MiniLLM)"),
    Method(kind=_L, name="jsd", summary="β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = βp + (1 − β)q",
           source="Agarwal et al. 2024 (GKD)", options=JsdOptions),
    Method(kind=_L, name="skew_forward_kl", summary="KL(p ‖ αp + (1 − α)q) (DistiLLM)",
           source="Ko et al. 2024 (DistiLLM)", options=SkewOptions),
    Method(kind=_L, name="skew_reverse_kl", summary="KL(q ‖ αq + (1 − α)p)", source="Ko et al. 2024 (DistiLLM)",
           options=SkewOptions),
    Method(kind=_L, name="akl", summary="adaptive KL: forward and reverse KL weighted by the gaps on the teacher's "
           "head and tail", source="Wu et al. 2024 (AKL)", options=AklOptions),
    Method(kind=_L, name="tv", summary="½ Σ abs(p − q)", source="total variation distance"),
    # ---------------------------------------------------------------- importance: dense-to-dense width pruning
    Method(kind=_I, name="minitron", summary="per MLP neuron, the L2 over calibration sequences of the mean over "
           "the sequence of abs(input to down_proj); per hidden channel, the same of every norm's output, summed",
           source=MINITRON),
    Method(kind=_I, name="magnitude", summary="per MLP neuron, norm(gate row) + norm(up row) + norm(down column); "
           "per hidden channel, the norm of its embedding column", source="weight-magnitude pruning"),
    # ---------------------------------------------------------------- baselines at the M2D student's size
    Method(kind=_B, name="d2d", summary="a dense teacher of the MoE teacher's total size, width-pruned to the "
           "student's parameter count, distilled from that dense teacher", source=PAPER + "; " + MINITRON),
    Method(kind=_B, name="random_ffn", summary="the student's architecture: embeddings, attention and norms from "
           "the MoE teacher, every MLP re-initialised; distilled from the MoE teacher", source=PAPER),
    Method(kind=_B, name="random_init", summary="the student's architecture initialised from scratch; distilled "
           "from the MoE teacher", source=PAPER),
)

METHODS: dict[tuple[str, str], Method] = {(m.kind, m.name): m for m in TABLE}
assert len(METHODS) == len(TABLE), "a method name is listed twice under one kind"


def names(kind: str) -> tuple[str, ...]:
    """The method names of `kind`, in table order (the canonical order of params defaults, plots and tables)."""
    return tuple(m.name for m in TABLE if m.kind == kind)


def get(kind: str, name: str) -> Method:
    """The entry of `name`; a ValueError naming the allowed names otherwise."""
    try:
        return METHODS[(kind, name)]
    except KeyError:
        raise ValueError(f"{name!r} is not a known {kind} method; choose one of {', '.join(names(kind))}") from None


def options(kind: str, name: str, given: dict | None = None) -> Options:
    """`given` validated by the method's options model, defaults filled in; a one-line ValueError naming each
    unknown option (with the allowed ones) and each bad value otherwise."""
    model = get(kind, name).options
    try:
        return model.model_validate(given or {})
    except ValidationError as err:
        errors = err.errors()
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
        out = [f"{kind} {name!r} has no option(s) {unknown}; allowed: {sorted(model.model_fields)}"] if unknown else []
        out += [f"{name} {e['loc'][0]}: {e['msg']} (got {e.get('input')!r})" for e in errors
                if e["type"] != "extra_forbidden"]
        raise ValueError("; ".join(out)) from None


def capture_passes(score_methods: Iterable[str], group_methods: Iterable[str] = ()) -> set[str]:
    """Calibration passes needed to score `score_methods` and group by `group_methods`. Routing is always in:
    it is nearly free, and reap, acp and do_acp divide by its selection counts. The merge-by score of each scoring
    method counts too (do_acp's groups merge by acp)."""
    scores = {n for m in score_methods for n in (m, get("score", m).merge_score)}
    out = {"routing"} | {get("score", m).capture for m in scores}
    out |= {INPUT_CAPTURE[get("grouping", g).reads] for g in group_methods}
    return {c for c in out if c is not None}


def check_registry(kind: str, registered: Iterable[str]) -> None:
    """Raise unless a registry holds exactly the table's methods of `kind` in table order (called at import)."""
    if tuple(registered) != names(kind):
        raise AssertionError(f"{kind} registry {tuple(registered)} != moe2dense.methods table {names(kind)}")


# ---------------------------------------------------------------- the README's tables
def _options_cell(m: Method) -> str:
    return ", ".join(f"`{k}` ({f.default:g})" for k, f in m.options.model_fields.items())


def _score_row(m: Method) -> list[str]:
    return [f"`{m.name}`", m.summary, m.capture or "", m.merge_score, _options_cell(m)]


def _grouping_row(m: Method) -> list[str]:
    return [f"`{m.name}`", m.summary, (m.clustering or "").replace("_", " "), m.reads or "",
            INPUT_CAPTURE[m.reads] or "teacher weights"]


#: kind -> (header, row function): the README tables generated from the table.
_TABLES = {
    "score": (["`score.method`", "score", "calibration pass", "groups merge by", "options (`score.options`)"],
              _score_row),
    "grouping": (["`group.method`", "groups by", "clustering", "reads", "from"], _grouping_row),
    "scaling": (["`group.scaling`", "c_g"], lambda m: [f"`{m.name}`", m.summary]),
    "loss": (["`distill.loss`", "definition", "options (`distill.loss_options`)"],
             lambda m: [f"`{m.name}`", m.summary, _options_cell(m)]),
    "importance": (["`baselines.prune.importance`", "importance"], lambda m: [f"`{m.name}`", m.summary]),
    "baseline": (["baseline", "what it is"], lambda m: [f"`{m.name}`", m.summary]),
}


def markdown(kind: str) -> str:
    """The README's table of the `kind` methods."""
    from moe2dense.markdown import render

    header, row = _TABLES[kind]
    return render(header, [row(m) for m in TABLE if m.kind == kind])


def _marker(kind: str) -> tuple[str, str]:
    return f"<!-- methods:{kind} (generated: python -m moe2dense methods --readme README.md) -->", \
        f"<!-- /methods:{kind} -->"


def update_readme(text: str) -> str:
    """`text` with the table between each kind's markers regenerated; a kind without markers is left alone."""
    for kind in KINDS:
        start, end = _marker(kind)
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + start + "\n" + markdown(kind) + end + rest.split(end, 1)[1]
    return text
