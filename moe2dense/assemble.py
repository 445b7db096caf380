"""Dense assembly (docs/architecture.md, "Merging and assembly"; the paper's Eq. 2): execute a conversion plan on a
teacher checkpoint and write the dense student as a standard Hugging Face checkpoint dir.

Per MoE layer the k merged experts (plus shared experts) become one SwiGLU MLP: gate and up rows are stacked, down
columns concatenated with block g's columns times c_g, so Dense(x) = sum_g c_g E_g(x) exactly (biases: the down bias
is sum_g c_g b_g; the clamped GPT-OSS activation is per neuron, so it concatenates too). Layers narrower than the
widest are zero-padded: a neuron with zero gate, up and down rows contributes exactly 0.

Streaming: the student's tensor layout is known before any weight is read (from the config on the meta device), so
`ShardedWriter` fixes the shard files up front and every tensor is written as soon as it exists. Memory holds one
teacher layer's selected experts and one student layer, never the teacher or the student whole.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moe2dense.arch import Adapter, ExpertWeights, get_adapter
from moe2dense.arch.generic import verify_student
from moe2dense.arch.registry import is_generic
from moe2dense.checkpoint import DTYPES, TOKENIZER_FILES, CheckpointReader, ShardedWriter
from moe2dense.grouping import merge_experts
from moe2dense.markdown import table
from moe2dense.plan import ConversionPlan, LayerPlan
from moe2dense.teacher_weights import (dense_mlp_width, read_dense_mlp, read_experts, read_shared_experts,
                                       shared_width)

Block = tuple[ExpertWeights, float]  # an expert (merged or shared, or a dense MLP) and its constant c


# ---------------------------------------------------------------------------------------------------- the algebra
def concat_blocks(blocks: list[Block], width: int, dtype: torch.dtype = torch.float32) -> ExpertWeights:
    """One SwiGLU MLP computing sum_b c_b f_b(x), zero-padded to `width` neurons, in `dtype`.

    Each output tensor is allocated once and filled block by block (c_b applied in float32, then cast), so a
    layer costs one student layer of fresh memory: on a VM a first touch of fresh pages costs more than the copy."""
    first = blocks[0][0]
    if any(w.act != first.act for w, _ in blocks):
        raise ValueError("blocks with different activations cannot be concatenated")
    H = first.down.shape[0]
    used = sum(w.up.shape[0] for w, _ in blocks)
    if used > width:
        raise ValueError(f"blocks have {used} neurons, more than the dense width {width}")
    device = first.up.device
    gated = first.gate is not None  # up-only (relu2) experts have no gate; `act` is the same for every block
    gate = torch.zeros(width, H, dtype=dtype, device=device) if gated else None
    up = torch.zeros(width, H, dtype=dtype, device=device)
    down = torch.zeros(H, width, dtype=dtype, device=device)
    has_bias = any(w.down_bias is not None or w.up_bias is not None for w, _ in blocks)
    gate_b = torch.zeros(width, dtype=dtype, device=device) if has_bias and gated else None
    up_b = torch.zeros(width, dtype=dtype, device=device) if has_bias else None
    down_b = torch.zeros(H, dtype=torch.float32, device=device) if has_bias else None
    start = 0
    for w, c in blocks:
        rows = slice(start, start + w.up.shape[0])
        if gated:
            gate[rows].copy_(w.gate)
        up[rows].copy_(w.up)
        down[:, rows].copy_(w.down.to(torch.float32) * c)
        if has_bias:
            if w.gate_bias is not None:
                gate_b[rows].copy_(w.gate_bias)
            if w.up_bias is not None:
                up_b[rows].copy_(w.up_bias)
            if w.down_bias is not None:
                down_b += w.down_bias.to(torch.float32) * c
        start = rows.stop
    return ExpertWeights(gate, up, down, gate_b, up_b, None if down_b is None else down_b.to(dtype),
                         act=first.act, swiglu_alpha=first.swiglu_alpha, swiglu_limit=first.swiglu_limit)


def scale_input(w: ExpertWeights, c: float) -> ExpertWeights:
    """f(c x) as an MLP of x: gate and up rows times c (float32, cast once by concat_blocks, as c on down is), biases
    and down unchanged. For a family whose routing weight scales the expert's input (llama4_text), block g's constant
    c_g goes here, not on down: SwiGLU is not homogeneous, silu(c G x) * (c U x) != c silu(G x) * (U x)."""
    return replace(w, gate=w.gate.float() * c, up=w.up.float() * c)


# ----------------------------------------------------------------------------------- the student's MLP, by family
# (adapter, layer, block, the student's layout: name -> (shape, dtype)) -> the layer's MLP tensors by name
MlpWriter = Callable[[Adapter, int, ExpertWeights, dict], dict[str, torch.Tensor]]
MLP_WRITERS: dict[str, MlpWriter] = {}


def register_mlp_writer(kind: str) -> Callable[[MlpWriter], MlpWriter]:
    def deco(fn: MlpWriter) -> MlpWriter:
        MLP_WRITERS[kind] = fn
        return fn
    return deco


@register_mlp_writer("mlp")
def _plain_mlp(adapter: Adapter, layer: int, block: ExpertWeights, student_keys: dict) -> dict[str, torch.Tensor]:
    if block.down_bias is not None or block.act != "swiglu":
        raise ValueError(f"a {adapter.dense_model_type} MLP has no biases and a plain SwiGLU")
    prefix = f"model.layers.{layer}.{adapter.spec.dense_mlp_attr}"
    return {f"{prefix}.gate_proj.weight": block.gate, f"{prefix}.up_proj.weight": block.up,
            f"{prefix}.down_proj.weight": block.down}


@register_mlp_writer("up_mlp")
def _up_mlp(adapter: Adapter, layer: int, block: ExpertWeights, student_keys: dict) -> dict[str, torch.Tensor]:
    """An ungated MLP (up_proj, down_proj; biases where the student has them) in the MoE block's place."""
    if block.gate is not None or block.act != adapter.spec.layout.act:
        raise ValueError(f"a {adapter.dense_model_type} MLP is {adapter.spec.layout.act} without gate")
    prefix = f"model.layers.{layer}.{adapter.spec.dense_mlp_attr}"
    out = {f"{prefix}.up_proj.weight": block.up, f"{prefix}.down_proj.weight": block.down}
    for proj, bias, size in (("up_proj", block.up_bias, block.up.shape[0]),
                             ("down_proj", block.down_bias, block.down.shape[0])):
        if f"{prefix}.{proj}.bias" in student_keys:  # mlp_bias=True: zeros where no block has a bias
            out[f"{prefix}.{proj}.bias"] = bias if bias is not None else block.up.new_zeros(size)
        elif bias is not None:
            raise ValueError(f"the {adapter.dense_model_type} student has no {proj} bias (mlp_bias=False)")
    return out


@register_mlp_writer("single_expert")
def _single_expert(adapter: Adapter, layer: int, block: ExpertWeights, student_keys: dict
                   ) -> dict[str, torch.Tensor]:
    """The same MoE family with one expert that every token uses with weight 1 (softmax over one logit), in the
    names `save_pretrained` writes: per-expert keys where the family stores them so, else fused."""
    spec, layout = adapter.spec, adapter.spec.layout
    prefix = adapter.block_path(layer)
    disk = prefix if spec.disk_block_attr is None else f"model.layers.{layer}.{spec.disk_block_attr}"  # minimax_m2
    H = block.down.shape[0]
    router = f"{disk}.{spec.router_attr}"
    proj = f".{spec.router.proj_attr}" if spec.router.proj_attr else ""
    out = {f"{router}{proj}.weight": block.gate.new_zeros(1, H)}
    if f"{prefix}.{spec.router_attr}{proj}.bias" in student_keys:
        out[f"{router}{proj}.bias"] = block.gate.new_zeros(1)
    if spec.router.bias_attr:  # the selection bias of one expert changes nothing
        owner = disk if spec.router.bias_on_block else router
        out[f"{owner}.{spec.router.bias_attr}"] = block.gate.new_zeros(1)
    # Any other router tensor is a multiplicative scale (gemma4_text's router.scale on the input, per_expert_scale
    # on the weight): ones keep the one expert's weight at exactly 1.
    for name in student_keys:
        if name.startswith(f"{prefix}.{spec.router_attr}."):
            key = disk + name[len(prefix):]
            if key not in out:
                out[key] = torch.ones(student_keys[name][0], dtype=block.gate.dtype, device=block.gate.device)
    if spec.disk_expert_prefix is not None:
        if block.down_bias is not None:
            raise ValueError(f"{adapter.model_type} experts have no biases")
        names = [f"model.layers.{layer}.{spec.disk_expert_prefix}.0.{p}.weight" for p in spec.disk_proj_names]
        return out | dict(zip(names, (block.gate, block.up, block.down)))
    experts = f"{prefix}.experts"
    if layout.interleaved:  # gate/up alternate along the 2W axis
        gate_up = torch.stack([block.gate, block.up], 1).reshape(-1, H)
    else:
        gate_up = torch.cat([block.gate, block.up])
    down = block.down
    if layout.transposed:
        gate_up, down = gate_up.T, down.T
    out[f"{experts}.gate_up_proj"] = gate_up[None]
    out[f"{experts}.down_proj"] = down[None]
    if layout.has_bias:
        gb = torch.stack([block.gate_bias, block.up_bias], 1).reshape(-1) if layout.interleaved \
            else torch.cat([block.gate_bias, block.up_bias])
        out[f"{experts}.gate_up_proj_bias"] = gb[None]
        out[f"{experts}.down_proj_bias"] = block.down_bias[None]
    return out


@register_mlp_writer("in_class")
def _in_class(adapter: Adapter, layer: int, block: ExpertWeights, student_keys: set[str]) -> dict[str, torch.Tensor]:
    """The teacher's own class with one expert (families found by arch.generic): in each layer whatever that class
    builds there, a plain SwiGLU MLP under the block's name or the one-expert block."""
    prefix = f"model.layers.{layer}.{adapter.spec.block_attr}"
    if f"{prefix}.gate_proj.weight" not in student_keys:
        return _single_expert(adapter, layer, block, student_keys)
    if block.down_bias is not None or block.act != "swiglu":
        raise ValueError(f"a {adapter.dense_model_type} MLP has no biases and a plain SwiGLU")
    return {f"{prefix}.gate_proj.weight": block.gate, f"{prefix}.up_proj.weight": block.up,
            f"{prefix}.down_proj.weight": block.down}


# ----------------------------------------------------------------------------------------------- the student config
def student_config(teacher: PreTrainedConfig, adapter: Adapter, width: int, dtype: torch.dtype) -> PreTrainedConfig:
    """The dense twin's config: every field the dense class knows is copied from the teacher (attention, rope,
    norms, vocabulary, tying), then the MLP width and, per family, the switches that make every layer dense."""
    spec = adapter.spec
    known = set(AutoConfig.for_model(spec.dense_model_type).to_dict())
    skip = {"model_type", "architectures", "transformers_version", "auto_map", "dtype", "torch_dtype"}
    kwargs = {k: v for k, v in teacher.to_dict().items() if k in known and k not in skip}
    kwargs[spec.dense_width_attr] = width
    if spec.dense_config:
        kwargs.update(spec.dense_config(teacher))
    if spec.dense_mlp in ("single_expert", "in_class"):
        kwargs[spec.num_experts_attr] = 1
        kwargs[spec.top_k_attr] = 1
        kwargs[spec.intermediate_attr] = width  # the one expert's width (a no-op where it is intermediate_size)
    if spec.first_dense_attr:
        kwargs[spec.first_dense_attr] = teacher.num_hidden_layers
    if spec.mlp_types_attr:
        kwargs[spec.mlp_types_attr] = ["dense"] * teacher.num_hidden_layers
    if spec.mlp_only_attr:
        kwargs[spec.mlp_only_attr] = list(range(teacher.num_hidden_layers))
    if spec.layer_types_attr:  # hybrids: the MoE layers become the family's dense MLP layers, the rest stay
        moe, dense = spec.layer_type_swap
        kwargs[spec.layer_types_attr] = [dense if t == moe else t for t in getattr(teacher, spec.layer_types_attr)]
    config = AutoConfig.for_model(spec.dense_model_type, **kwargs)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[spec.dense_model_type]]
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def student_layout(config: PreTrainedConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every parameter and buffer the student saves, from a meta-device instance."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    return {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()
            if not (tied and n == "lm_head.weight")}


def student_num_parameters(config: PreTrainedConfig) -> int:
    """Parameters only: the saved tensors also hold persistent buffers (minimax_m2's e_score_correction_bias)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------------------- assembly
def layer_blocks(reader: CheckpointReader, adapter: Adapter, layer: int, layer_plan: LayerPlan | None,
                 align: bool) -> list[Block]:
    """The (expert, c) blocks of one layer: merged groups and shared experts, or an originally dense MLP."""
    if layer in adapter.dense_layers:
        return [(read_dense_mlp(reader, adapter, layer), 1.0)]
    groups = layer_plan.groups
    experts = read_experts(reader, adapter, layer, [e for g in groups for e in g.experts])
    blocks = [(merge_experts([experts[e] for e in g.experts], list(g.weights), align=align), g.scale)
              for g in groups]
    if adapter.spec.router.scales_input:
        blocks = [(scale_input(w, c), 1.0) for w, c in blocks]
    shared = read_shared_experts(reader, adapter, layer)
    if len(shared) != len(layer_plan.shared):
        raise ValueError(f"layer {layer}: the plan has {len(layer_plan.shared)} shared experts, the teacher "
                         f"{len(shared)}")
    return blocks + [(w, s.scale) for w, s in zip(shared, layer_plan.shared)]


def layer_width(reader: CheckpointReader, adapter: Adapter, layer: int, layer_plan: LayerPlan | None) -> int:
    if layer in adapter.dense_layers:
        return dense_mlp_width(reader, adapter, layer)
    return len(layer_plan.groups) * adapter.intermediate_size + shared_width(reader, adapter, layer)


def check_plan(plan: ConversionPlan, adapter: Adapter) -> None:
    t = plan.teacher
    if (t.model_type, t.num_experts, list(t.moe_layers)) != (adapter.model_type, adapter.num_experts,
                                                             list(adapter.moe_layers)):
        raise ValueError(f"the plan was made for a {t.model_type} with {t.num_experts} experts on layers "
                         f"{list(t.moe_layers)}; this teacher is a {adapter.model_type} with {adapter.num_experts} "
                         f"on {adapter.moe_layers}: rerun grouping for this teacher")


def _teacher_dtype(reader: CheckpointReader, adapter: Adapter) -> torch.dtype:
    names = [adapter.disk_name(n) for n in ("model.embed_tokens.weight", "model.embeddings.weight")]
    name = next((n for n in names if n in reader), None)  # nemotron_h calls its embedding `embeddings`
    return reader.dtype(name) if name else torch.float32


def assemble(teacher_dir: str | Path, plan: ConversionPlan, out: str | Path, *, dtype: str = "auto",
             max_shard_bytes: int = 5 * 2**30, tokenizer_dir: str | Path | None = None, card: str = "",
             progress: bool = True) -> dict:
    """Execute `plan` (decided by stage group: blocks, merge weights, scales): write the dense student into `out`
    (an empty dir, made atomic by the caller). Returns a summary."""
    if not isinstance(plan, ConversionPlan):
        raise TypeError(f"assemble takes a ConversionPlan (moe2dense.plan.build_plan or read_plan), got "
                        f"{type(plan).__name__}")
    teacher_dir, out = Path(teacher_dir), Path(out)
    tconfig = AutoConfig.from_pretrained(teacher_dir)
    adapter = get_adapter(tconfig)
    check_plan(plan, adapter)
    reader = CheckpointReader(teacher_dir)
    try:
        target = _teacher_dtype(reader, adapter) if dtype == "auto" else DTYPES[dtype]
        plans = plan.layers
        widths = {layer: layer_width(reader, adapter, layer, plans.get(layer)) for layer in adapter.mlp_layers}
        width = max(widths.values())
        config = student_config(tconfig, adapter, width, target)
        layout = student_layout(config)
        writer_fn = MLP_WRITERS[adapter.spec.dense_mlp]
        # The MLP tensors' names and shapes come from running the writer on meta tensors of the final shape.
        keys = layout  # the writers look names (and the single expert's router scales, shapes) up here
        H = tconfig.hidden_size
        meta_mlp = {}
        for layer in adapter.mlp_layers:
            meta = concat_blocks([(_meta_block(widths[layer], H, adapter), 1.0)], width, target)
            meta_mlp.update({n: tuple(t.shape) for n, t in writer_fn(adapter, layer, meta, keys).items()})
        # Everything outside the student's MLP modules is copied: not the writer's (granite's student has `mlp`
        # where the teacher has `block_sparse_moe`) nor what the MLP replaces in the teacher (its block, or
        # gemma4_text's router and experts beside the layer's own dense MLP, which is kept).
        replaced = tuple({".".join(n.split(".")[:4]) + "." for n in meta_mlp}
                         | {p for i in adapter.mlp_layers for p in adapter.replaced_prefixes(i)})
        copied = [n for n in layout if not n.startswith(replaced)]
        if missing := [n for n in copied if adapter.disk_name(n) not in reader]:
            raise ValueError(f"the teacher checkpoint lacks tensors the {config.model_type} student needs: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        shard_plan = [(n, layout[n][0], target if layout[n][1].is_floating_point else layout[n][1]) for n in copied]
        def read(name: str) -> torch.Tensor:  # a copied tensor, by its in-memory name (nemotron_h: "backbone." on disk)
            key = adapter.disk_name(name)
            return reader.read(key).to(_cast(reader.dtype(key), target))
        shard_plan += [(n, shape, target) for n, shape in meta_mlp.items()]
        params = student_num_parameters(config)
        with ShardedWriter(out, shard_plan, max_shard_bytes=max_shard_bytes) as writer:
            by_layer: dict[int | None, list[str]] = {}
            for n in copied:
                by_layer.setdefault(_layer_of(n), []).append(n)
            for n in by_layer.pop(None, []):
                writer.write(n, read(n))
            for layer in tqdm(range(adapter.num_layers), desc="assemble", unit="layer", disable=not progress):
                for n in by_layer.get(layer, []):
                    writer.write(n, read(n))
                if layer not in widths:  # no MLP in this layer (a hybrid's Mamba or attention layer)
                    continue
                blocks = layer_blocks(reader, adapter, layer, plans.get(layer), plan.align)
                for n, t in writer_fn(adapter, layer, concat_blocks(blocks, width, target), keys).items():
                    writer.write(n, t.to(target).contiguous())
                del blocks
            if is_generic(adapter):  # the student of a discovered family is checked, not assumed
                check = [adapter.moe_layers[0], *adapter.dense_layers[:1]]
                references = {i: concat_blocks(layer_blocks(reader, adapter, i, plans.get(i), plan.align), width,
                                               target) for i in check}
    finally:
        reader.close()
    config.save_pretrained(out)
    _generation_config(teacher_dir, config, out)
    if tokenizer_dir is not None:
        copy_tokenizer(Path(tokenizer_dir), out)
    summary = {"model_type": config.model_type, "teacher_model_type": adapter.model_type, "intermediate_size": width,
               "num_parameters": params, "dtype": str(target).removeprefix("torch."),
               "bytes": sum(math.prod(s) * d.itemsize for _, s, d in shard_plan)}
    single = adapter.spec.dense_mlp == "single_expert"
    text = card or model_card(plan.to_json(), summary, teacher_dir, single)
    if not card and adapter.spec.router.scales_input:
        text += INPUT_SCALED.format(family=adapter.model_type)
    (out / "README.md").write_text(text)
    if is_generic(adapter):
        verify_student(out, adapter, references)
    return summary


def _meta_block(neurons: int, hidden: int, adapter: Adapter) -> ExpertWeights:
    z = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    bias, gated = adapter.spec.layout.has_bias, adapter.spec.layout.has_gate
    return ExpertWeights(z(neurons, hidden) if gated else None, z(neurons, hidden), z(hidden, neurons),
                         z(neurons) if bias and gated else None, z(neurons) if bias else None,
                         z(hidden) if bias else None, act=adapter.spec.layout.act)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else None


def _cast(source: torch.dtype, target: torch.dtype) -> torch.dtype:
    return target if source.is_floating_point else source


def _generation_config(teacher_dir: Path, config: PreTrainedConfig, out: Path) -> None:
    src = teacher_dir / "generation_config.json"
    if src.is_file():
        shutil.copyfile(src, out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(out)


def copy_tokenizer(src: Path, out: Path) -> None:
    found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not found:
        raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    for f in found:
        shutil.copyfile(src / f, out / f)


WHY_SINGLE_EXPERT = (
    "{family} has no dense counterpart in transformers, so the student is a {family} model with a single expert "
    "that every token uses with weight 1 (a softmax over one logit). It computes exactly a dense SwiGLU MLP of "
    "width {width} and loads with `AutoModelForCausalLM.from_pretrained` like any {family} checkpoint."
)


INPUT_SCALED = (
    "\n{family} multiplies each expert's input, not its output, by the routing score, so here each block's constant "
    "c_g is folded into its gate and up rows (the MLP computes sum_g E_g(c_g x)) and the down projection is the "
    "merged expert's own.\n"
)


# The card names the code that made the checkpoint; read at import, so a missing install fails before any work.
PACKAGE = "moe2dense"
VERSION = version(PACKAGE)


def model_card(plan: dict, summary: dict, teacher_dir: Path, single_expert: bool) -> str:
    t = plan["teacher"]
    lines = [
        "---", "library_name: transformers", "tags: [moe2dense, dense, pruned, moe-to-dense]", "---", "",
        f"# Dense {summary['model_type']} converted from a {t['model_type']} MoE", "",
        f"Made by {PACKAGE} {VERSION} from the teacher at `{teacher_dir}` ({t['model_type']}, "
        f"{t['num_experts']} experts per layer, top-{t['top_k']}, {len(t['moe_layers'])} MoE layers).", "",
        *table(["", ""], [
            ["parameters", f"{summary['num_parameters']:,}"],
            ["dtype", summary["dtype"]],
            ["MLP width", summary["intermediate_size"]],
            ["expert scoring", f"{plan['score_method']} (merge weights by {plan['merge_scores']})"],
            ["experts kept per layer (K)", plan["experts_per_layer"]],
            ["dense blocks per layer (k)", plan["blocks_per_layer"]],
            ["grouping", f"{'none (pure pruning, K == k)' if plan['pure_pruning'] else plan['group_method']}"
                         f"{' + neuron alignment' if plan['align'] else ''}"],
            ["magnitude scaling", plan["scaling"]]]), "",
        "## How it was made", "",
        "Routing statistics of the teacher over calibration text scored every expert; K experts per layer were "
        "kept, grouped into k blocks and merged (score-weighted average), and the blocks concatenated into one "
        "SwiGLU MLP per layer whose down projection carries each block's constant c_g in place of the routing "
        "weight, so the MLP computes sum_g c_g E_g(x). Attention, embeddings and norms are the teacher's, "
        "unchanged. This checkpoint is the assembled model before distillation.", "",
    ]
    if single_expert:
        lines += [WHY_SINGLE_EXPERT.format(family=summary["model_type"], width=summary["intermediate_size"]), ""]
    lines += ["## Per-layer plan", "", "```json", json.dumps(_plan_digest(plan), indent=1), "```", ""]
    return "\n".join(lines)


def _plan_digest(plan: dict) -> dict:
    return {layer: [[g["experts"], round(g["scale"], 4)] for g in lp["groups"]] for layer, lp in plan["layers"].items()}
