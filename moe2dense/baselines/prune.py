"""Dense-to-dense width pruning (the d2d baseline): a dense Llama-style teacher cut to a target parameter count.

Which axis of which tensor is a hidden (embedding) channel and which an MLP neuron is one declarative table per
family (`FAMILIES`); everything else derives from it: the parameter count as a function of (hidden h, MLP width w),
the validation of a checkpoint's tensor names and shapes (from the safetensors headers, before any weight is read),
the output plan and the streaming copy. Attention heads are never pruned: q/k/v/o keep their head axes, and head_dim
is written into the pruned config explicitly so a smaller hidden size does not change it.

The same MLP width is kept in every layer (each layer keeps its own top-w neurons). The width comes first: when a
cut of at most `max_mlp_cut` of the neurons reaches the target, only MLP neurons go; otherwise the MLP is cut by
max_mlp_cut and hidden channels go too. Widths are rounded to the largest multiple in `MULTIPLES` that keeps the
count within `TOLERANCE` of the target.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moe2dense.checkpoint import CheckpointReader, ShardedWriter

HIDDEN, MLP = "hidden", "mlp"
MULTIPLES = (128, 64, 32, 16, 8, 4, 2, 1)
TOLERANCE = 0.01  # relative distance of the pruned count from the target
CHUNK_BYTES = 16 * 2**20  # rows read per step when a tensor loses columns: the peak is the pruned tensor + this

# Tensor names the importance functions read (the same names every family in FAMILIES uses).
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
MLP_WEIGHT = "model.layers.{layer}.mlp.{proj}_proj.weight"
DOWN_PROJ_MODULE = re.compile(r"model\.layers\.(\d+)\.mlp\.down_proj")  # its input: one value per MLP neuron
HIDDEN_NORM_MODULE = re.compile(r"model\.(?:layers\.\d+\.(?:input_layernorm|post_attention_layernorm)|norm)")


@dataclass(frozen=True)
class Rule:
    """Tensors whose name fully matches `pattern`; `axes` maps an axis to HIDDEN or MLP (other axes are kept
    whole). A pattern with MLP axes names the layer in a group `layer`."""

    pattern: str
    axes: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        kinds = [k for _, k in self.axes]
        assert kinds.count(HIDDEN) <= 1 and kinds.count(MLP) <= 1, f"{self.pattern}: one axis of each kind at most"
        assert MLP not in kinds or "(?P<layer>" in self.pattern, f"{self.pattern}: MLP axes need the layer group"


_L = r"model\.layers\.(?P<layer>\d+)\."
LLAMA_STYLE: tuple[Rule, ...] = (
    Rule(r"model\.embed_tokens\.weight", ((1, HIDDEN),)),
    Rule(r"lm_head\.weight", ((1, HIDDEN),)),
    Rule(r"model\.norm\.weight", ((0, HIDDEN),)),
    Rule(_L + r"(?:input_layernorm|post_attention_layernorm)\.weight", ((0, HIDDEN),)),
    Rule(_L + r"self_attn\.[qkv]_proj\.weight", ((1, HIDDEN),)),
    Rule(_L + r"self_attn\.[qkv]_proj\.bias"),  # per head channel
    Rule(_L + r"self_attn\.o_proj\.weight", ((0, HIDDEN),)),
    Rule(_L + r"self_attn\.o_proj\.bias", ((0, HIDDEN),)),
    Rule(_L + r"self_attn\.[qk]_norm\.weight"),  # per head_dim (qwen3)
    Rule(_L + r"mlp\.(?:gate|up)_proj\.weight", ((0, MLP), (1, HIDDEN))),
    Rule(_L + r"mlp\.(?:gate|up)_proj\.bias", ((0, MLP),)),
    Rule(_L + r"mlp\.down_proj\.weight", ((0, HIDDEN), (1, MLP))),
    Rule(_L + r"mlp\.down_proj\.bias", ((0, HIDDEN),)),
)
#: model_type -> its tensor table. A family is supported when its dense checkpoints use only these names.
FAMILIES: dict[str, tuple[Rule, ...]] = {"qwen3": LLAMA_STYLE, "qwen2": LLAMA_STYLE, "llama": LLAMA_STYLE,
                                         "mistral": LLAMA_STYLE}
_COMPILED = {rules: [(re.compile(r.pattern), r) for r in rules] for rules in set(FAMILIES.values())}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    axes: tuple[tuple[int, str], ...]
    layer: int | None

    def numel(self, hidden: int, width: int) -> int:
        size = dict(enumerate(self.shape)) | {a: (hidden if k == HIDDEN else width) for a, k in self.axes}
        return math.prod(size[a] for a in range(len(self.shape)))


@dataclass(frozen=True)
class Layout:
    """A dense teacher checkpoint as the pruner sees it: its config.json and every tensor's role."""

    config: dict
    tensors: tuple[Tensor, ...]
    hidden: int  # the teacher's hidden_size
    width: int  # its intermediate_size
    num_layers: int
    tied: bool

    def num_parameters(self, hidden: int, width: int) -> int:
        """Parameters of the model pruned to (hidden, width): the saved tensors, without a tied lm_head."""
        return sum(t.numel(hidden, width) for t in self.tensors)

    def coefficients(self) -> tuple[int, int, int, int]:
        """(a, b, c, d) with num_parameters(h, w) = a + b h + c w + d h w (each tensor has at most one axis of each
        kind, so the count is bilinear)."""
        a = self.num_parameters(0, 0)
        b, c = self.num_parameters(1, 0) - a, self.num_parameters(0, 1) - a
        return a, b, c, self.num_parameters(1, 1) - a - b - c


def dense_family(config) -> str:
    """The model_type of a dense teacher config this module can prune; a one-line ValueError naming the supported
    ones otherwise (the dense teacher stage calls it before recording a real checkpoint)."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"baselines.dense_teacher.source: model_type {config.model_type!r} is not a supported dense "
                         f"family for width pruning; supported: {', '.join(sorted(FAMILIES))}")
    return config.model_type


def read_config(checkpoint: Path) -> dict:
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the dense teacher is a Hugging Face checkpoint dir")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a JSON object")
    return raw


def read_layout(checkpoint: str | Path) -> Layout:
    """Validate a dense teacher from its config.json and safetensors headers (no weight is read): a supported
    model_type, every tensor named by the family's table, and the hidden / MLP axes of the sizes config.json states.
    Each problem is one line naming the file."""
    checkpoint = Path(checkpoint)
    raw = read_config(checkpoint)
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{checkpoint / 'config.json'}: model_type {model_type!r} is not a supported dense family "
                         f"for width pruning; supported: {', '.join(sorted(FAMILIES))}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] < 1:
            raise ValueError(f"{checkpoint / 'config.json'}: {key} must be a positive integer, got {raw.get(key)!r}")
    H, I = raw["hidden_size"], raw["intermediate_size"]
    tied = bool(raw.get("tie_word_embeddings", False))
    rules = _COMPILED[FAMILIES[model_type]]
    tensors = []
    with CheckpointReader(checkpoint) as reader:
        for name in reader.keys():
            hit = next(((m, r) for p, r in rules if (m := p.fullmatch(name))), None)
            if hit is None:
                raise ValueError(f"{checkpoint}: tensor {name!r} is not one a dense {model_type} checkpoint has "
                                 f"(unknown to the pruning table of moe2dense/baselines/prune.py); supported "
                                 f"model_types: {', '.join(sorted(FAMILIES))}")
            match, rule = hit
            if tied and name == LM_HEAD:  # tied: the embedding is the head (save_pretrained drops it too)
                continue
            shape = reader.shape(name)
            for axis, kind in rule.axes:
                want = H if kind == HIDDEN else I
                if axis >= len(shape) or shape[axis] != want:
                    raise ValueError(f"{checkpoint}: tensor {name!r} has shape {list(shape)}, but config.json's "
                                     f"{'hidden_size' if kind == HIDDEN else 'intermediate_size'} {want} says axis "
                                     f"{axis} should be that size")
            layer = int(match.group("layer")) if "layer" in match.groupdict() else None
            tensors.append(Tensor(name, shape, reader.dtype(name), rule.axes, layer))
    if EMBED not in {t.name for t in tensors}:
        raise ValueError(f"{checkpoint}: no {EMBED!r} tensor; not a {model_type} checkpoint")
    return Layout(raw, tuple(tensors), H, I, raw["num_hidden_layers"], tied)


# ---------------------------------------------------------------------------------------------- choosing the sizes
@dataclass(frozen=True)
class Sizes:
    hidden: int
    width: int
    multiple: int
    parameters: int
    target: int

    @property
    def relative_error(self) -> float:
        return (self.parameters - self.target) / self.target


def choose_sizes(layout: Layout, target: int, max_mlp_cut: float) -> Sizes:
    """The (hidden, width) closest to `target` parameters: MLP width alone when a cut of at most max_mlp_cut
    reaches it, else the MLP cut by max_mlp_cut and hidden channels solved for; both rounded to the largest multiple
    in MULTIPLES that stays within TOLERANCE. A target out of reach is a one-line ValueError."""
    H, I = layout.hidden, layout.width
    a, b, c, d = layout.coefficients()
    teacher = layout.num_parameters(H, I)
    fix = "change the student (select.experts / group.k) or baselines.dense_teacher"
    if target > teacher:
        raise ValueError(f"the M2D student's {target:,} parameters are more than the dense teacher's {teacher:,}: "
                         f"pruning can only shrink; {fix}")
    width_alone = (target - a - b * H) / (c + d * H)  # exact width at the teacher's hidden size
    floor = I * (1 - max_mlp_cut)
    mlp_only = width_alone >= floor
    for m in MULTIPLES:
        if mlp_only:
            h, w = H, min(I, max(m, round(width_alone / m) * m))
        else:  # cut exactly max_mlp_cut (rounded up to the multiple, so never more), solve the hidden size
            w = min(I, math.ceil(floor / m) * m)
            h = min(H, round((target - a - c * w) / (b + d * w) / m) * m)
            if h < 1:
                continue
        count = layout.num_parameters(h, w)
        if abs(count - target) <= TOLERANCE * target:
            return Sizes(h, w, m, count, target)
    if not mlp_only and layout.num_parameters(1, math.ceil(floor)) > target:
        raise ValueError(f"the M2D student's {target:,} parameters are below the dense teacher's "
                         f"{layout.num_parameters(1, math.ceil(floor)):,} at hidden size 1 and MLP width "
                         f"{math.ceil(floor)} (baselines.prune.max_mlp_cut {max_mlp_cut}): attention heads are never "
                         f"pruned; raise baselines.prune.max_mlp_cut or {fix}")
    raise ValueError(f"no {'MLP width' if mlp_only else 'hidden size'} of the dense teacher (hidden {H}, MLP {I}) "
                     f"comes within {TOLERANCE:.0%} of the M2D student's {target:,} parameters; {fix}")


def top_indices(importance: torch.Tensor, k: int) -> torch.Tensor:
    """The k most important indices, ascending (ties: the lower index first, so the choice is deterministic)."""
    order = torch.sort(importance.float().cpu(), descending=True, stable=True).indices
    return order[:k].sort().values


# ---------------------------------------------------------------------------------------------------- the checkpoint
def pruned_config(layout: Layout, hidden: int, width: int) -> dict:
    raw = dict(layout.config, intermediate_size=width)
    if hidden != layout.hidden:
        raw["head_dim"] = raw.get("head_dim") or layout.hidden // raw["num_attention_heads"]
        raw["hidden_size"] = hidden
    return raw


def transformers_count(config: dict) -> int:
    """The parameter count transformers builds from `config` (on the meta device): checks the table's closed form."""
    from transformers import AutoConfig

    from moe2dense.assemble import student_num_parameters

    raw = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    return student_num_parameters(AutoConfig.for_model(config["model_type"], **raw))


def _pruned_tensor(reader: CheckpointReader, t: Tensor, keep: dict[int, torch.Tensor]) -> torch.Tensor:
    """t with each axis in `keep` reduced to those indices, reading only the kept rows, and the rows in chunks of
    CHUNK_BYTES when columns go too, so memory holds the result and one chunk."""
    rows, cols = keep.get(0), keep.get(1)
    if rows is None and cols is None:
        return reader.read(t.name)
    row_ids = rows.tolist() if rows is not None else list(range(t.shape[0]))
    if cols is None:
        return reader.read_rows(t.name, row_ids)
    out = torch.empty(len(row_ids), len(cols), *t.shape[2:], dtype=t.dtype)
    step = max(1, CHUNK_BYTES // (math.prod(t.shape[1:]) * t.dtype.itemsize))
    for i in range(0, len(row_ids), step):
        out[i:i + step] = reader.read_rows(t.name, row_ids[i:i + step]).index_select(1, cols)
    return out


def prune_checkpoint(layout: Layout, checkpoint: str | Path, out: str | Path, hidden_keep: torch.Tensor,
                     mlp_keep: torch.Tensor, max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> dict:
    """Stream `checkpoint` tensor by tensor into `out`, keeping hidden channels `hidden_keep` [h] and, in layer l,
    MLP neurons `mlp_keep[l]` (both ascending). Writes the weights and config.json (and generation_config.json);
    returns the pruned config."""
    checkpoint, out = Path(checkpoint), Path(out)
    h, w = len(hidden_keep), mlp_keep.shape[1]
    if mlp_keep.shape[0] != layout.num_layers:
        raise ValueError(f"mlp_keep has {mlp_keep.shape[0]} layers, the teacher {layout.num_layers}")
    hidden_idx = None if h == layout.hidden else hidden_keep.long()

    def keep(t: Tensor) -> dict[int, torch.Tensor]:
        idx = {a: hidden_idx if k == HIDDEN else (None if w == layout.width else mlp_keep[t.layer].long())
               for a, k in t.axes}
        return {a: i for a, i in idx.items() if i is not None}

    plan = [(t.name, tuple(int(t.shape[a]) if a not in dict(t.axes) else (h if dict(t.axes)[a] == HIDDEN else w)
                           for a in range(len(t.shape))), t.dtype) for t in layout.tensors]
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointReader(checkpoint) as reader, ShardedWriter(out, plan, max_shard_bytes) as writer:
        for t in tqdm(layout.tensors, desc="prune", unit="tensor", disable=not progress):
            writer.write(t.name, _pruned_tensor(reader, t, keep(t)))
    config = pruned_config(layout, h, w)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (checkpoint / "generation_config.json").is_file():
        shutil.copyfile(checkpoint / "generation_config.json", out / "generation_config.json")
    return config


def model_card(layout: Layout, sizes: Sizes, importance: str, source: str, tokens: int) -> str:
    from moe2dense.assemble import PACKAGE, VERSION
    from moe2dense.markdown import table

    cfg = layout.config
    teacher = layout.num_parameters(layout.hidden, layout.width)
    how = (f"on {tokens:,} calibration tokens" if tokens else "from the weights alone")
    return "\n".join([
        "---", "library_name: transformers", "tags: [moe2dense, dense, pruned, minitron, d2d-baseline]", "---", "",
        f"# Dense {cfg['model_type']} width-pruned to the MoE-to-dense student's size", "",
        f"Made by {PACKAGE} {VERSION} from the dense teacher at `{source}`: the dense-to-dense (d2d) baseline, "
        "before distillation.", "",
        *table(["", "teacher", "pruned"], [
            ["parameters", f"{teacher:,}", f"{sizes.parameters:,}"],
            ["target (the M2D student's parameters)", "", f"{sizes.target:,} ({sizes.relative_error:+.3%})"],
            ["hidden size", layout.hidden, sizes.hidden],
            ["MLP width (every layer)", layout.width, sizes.width],
            ["attention heads x head_dim", f"{cfg['num_attention_heads']} x "
             f"{cfg.get('head_dim') or layout.hidden // cfg['num_attention_heads']}", "unchanged"],
            ["importance", "", f"{importance} ({how})"],
            ["widths rounded to a multiple of", "", sizes.multiple]]), "",
        "## How it was made", "",
        f"Every MLP neuron and hidden (embedding) channel of the teacher was scored by `{importance}` (moe2dense/"
        "baselines/importance.py). Each layer kept its own most important neurons, the same number in every layer; "
        "hidden channels were pruned only when cutting the MLP alone could not reach the target within "
        "`baselines.prune.max_mlp_cut`. Attention heads are never pruned. Kept rows and columns are copied unchanged, "
        "in their original order.", ""])


def prune(layout: Layout, checkpoint: str | Path, out: str | Path, sizes: Sizes, mlp_importance: torch.Tensor,
          hidden_importance: torch.Tensor, *, importance: str, source: str, tokens: int, tokenizer_dir: str | Path,
          max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> dict:
    """Keep each layer's top `sizes.width` neurons of `mlp_importance` [L, I] and the top `sizes.hidden` channels of
    `hidden_importance` [H]; write a stock Hugging Face checkpoint with tokenizer and card into `out`."""
    from moe2dense.assemble import copy_tokenizer

    if tuple(mlp_importance.shape) != (layout.num_layers, layout.width) or \
            tuple(hidden_importance.shape) != (layout.hidden,):
        raise ValueError(f"importance shapes {list(mlp_importance.shape)} / {list(hidden_importance.shape)} do not "
                         f"fit the teacher's [{layout.num_layers}, {layout.width}] / [{layout.hidden}]")
    hidden_keep = top_indices(hidden_importance, sizes.hidden)
    mlp_keep = torch.stack([top_indices(row, sizes.width) for row in mlp_importance])
    config = prune_checkpoint(layout, checkpoint, out, hidden_keep, mlp_keep, max_shard_bytes, progress)
    copy_tokenizer(Path(tokenizer_dir), Path(out))
    (Path(out) / "README.md").write_text(model_card(layout, sizes, importance, str(source), tokens))
    return config
