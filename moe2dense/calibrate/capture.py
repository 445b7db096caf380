"""Capture routing and expert-output statistics of a frozen MoE teacher over calibration tokens.

One forward hook per MoE layer on the router module sees the hidden states entering the router and the routing the
router returned, `(logits, top-k weights, top-k index)` (each FamilySpec's router, moe2dense/arch; gemma4_text returns
probabilities first); the experts' input is the router's, or a norm of it where the spec says so
(`Adapter.expert_input`). For each batch it adds the `LayerStats` sums in float64 (p_t = the family's softmax or
sigmoid of the logits) and streams one Parquet row per token to `routing/layer=<L>/` (layout in `store`). The
expert-output passes run only when a scoring method needs them (`scoring.required_capture`):

- "routed_outputs": ||f_e(x_t)|| for each routed pair (t, e), each expert run on its own tokens only;
- "all_outputs":    every expert on every token in blocks of `token_chunk` tokens (bounded [E, chunk, H] buffer),
                    adding norms, squared norms and the Gram matrix; routed norms are then read off the same block.

Routing rows are encoded and written by background threads (`writer_threads`) while the forward runs. Nothing is
kept per token in RAM: the accumulators are O(E^2) per layer, each routing writer holds at most one row group plus
one batch, and about one batch of rows waits for the writer threads, so memory does not grow with the number of
calibration tokens.

Teachers larger than RAM (or GPU memory) are captured layer by layer (`capture_layerwise`, calibrate.offload:
layer; the machinery is in `layerwise`): the same hooks on the same router modules, one decoder layer loaded at a time.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm.auto import tqdm

from moe2dense.arch import Adapter, get_adapter
from moe2dense.arch.generic import with_verified_teacher
from moe2dense.arch.registry import is_generic
from moe2dense.calibrate.store import RoutingWriter, write_meta, write_stats
from moe2dense.data.packing import iter_packed_batches
from moe2dense.scoring import CAPTURES, LayerStats

F64 = torch.float64
FP32_SLICE_BYTES = 64 * 2**20  # the fp32 slice of an all-experts block that norms and the Gram product read


def _hidden(model: nn.Module) -> int:
    return model.config.hidden_size


def expert_chunk(adapter: Adapter, hidden: int, dtype: torch.dtype, token_chunk: int, budget_bytes: int) -> int:
    """Tokens per all-experts block: the most whose buffers fit `budget_bytes` (calibrate.expert_pass_mb), at most
    `token_chunk`. Per token and expert the pass holds about the gate/up product (2I), the activation's temporaries
    (2I) and the output (H) in the weights' dtype, plus headroom for the activations that need more (gpt_oss's clamp):
    E * (5I + 2H) * itemsize bytes."""
    per_token = adapter.num_experts * (5 * adapter.intermediate_size + 2 * hidden) * dtype.itemsize
    return max(1, min(token_chunk, budget_bytes // per_token))


class _Batch:
    """Per-token row labels of the batch being run, shared by every layer's hook."""

    def __init__(self, first_seq: int, n_rows: int, seq_len: int, domains: list[str]):
        self.n_tokens = n_rows * seq_len
        self.seq = np.repeat(np.arange(first_seq, first_seq + n_rows, dtype=np.int32), seq_len)
        self.pos = np.tile(np.arange(seq_len, dtype=np.int32), n_rows)
        # One string when the batch has one domain (the common case for domain-packed data): no per-token array.
        self.domain = domains[0] if len(set(domains)) == 1 else np.repeat(np.asarray(domains, dtype=str), seq_len)


class _WriterThreads:
    """Runs the routing writers' appends on background threads so building and compressing Parquet row groups
    (pyarrow releases the GIL) overlaps the teacher's forward, and the layers' row groups are written in parallel.
    Writer i always runs on thread i % threads, so each writer gets its appends in order. At most `max_pending`
    appends are queued (memory stays bounded); a writer error is raised in the capture thread at the next submit
    or at `join`. With threads=0 every append runs inline."""

    def __init__(self, threads: int, max_pending: int):
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix="moe2dense-routing-writer") for _ in range(threads)]
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def submit(self, writer_index: int, fn: Callable, *args) -> None:
        if not self._threads:
            fn(*args)
            return
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._threads[writer_index % len(self._threads)].submit(fn, *args))

    def wait(self) -> None:
        """Wait for every queued append, re-raising the first error."""
        while self._pending:
            self._pending.popleft().result()

    def join(self) -> None:
        """Wait for every queued append (re-raising the first error) and stop the threads."""
        try:
            self.wait()
        finally:
            for t in self._threads:
                t.shutdown(wait=True, cancel_futures=True)


class _LayerCapture:
    """Forward hook of one MoE layer's router: accumulates that layer's `LayerStats` sums and routing rows."""

    def __init__(self, model: nn.Module, adapter: Adapter, layer: int, writer: RoutingWriter, submit: Callable,
                 needs: set[str], store_probs: bool, token_chunk: int, device: torch.device,
                 expert_pass_bytes: int = 2**30):
        self.model, self.adapter, self.layer, self.writer, self.submit = model, adapter, layer, writer, submit
        self.store_probs, self.token_chunk = store_probs, token_chunk
        self.routed, self.all = "routed_outputs" in needs, "all_outputs" in needs
        E = adapter.num_experts
        zeros = lambda *shape: torch.zeros(*shape, dtype=F64, device=device)  # noqa: E731
        self.count, self.prob_sum, self.prob_sum_selected, self.weight_sum = (zeros(E) for _ in range(4))
        self.norm_sum_routed = self.gnorm_sum_routed = self.norm_sum_all = self.sqnorm_sum_all = self.gram = None
        if self.routed:
            self.norm_sum_routed, self.gnorm_sum_routed = zeros(E), zeros(E)
        if self.all:
            self.norm_sum_all, self.sqnorm_sum_all, self.gram = zeros(E), zeros(E), zeros(E, E)
        # Views of the fused expert tensors, built once; only the routed-only pass loops over experts.
        self._experts = [adapter.expert_weights(model, layer, e) for e in range(E)] if self.routed and not self.all \
            else None
        self._softmax = adapter.spec.router.score == "softmax"
        self._returns_probs = adapter.spec.router.returns_probs
        self.batch: _Batch | None = None
        self.shared_gate_sum = zeros(()) if adapter.spec.shared_gate_attr else None
        if self.all:  # the all-experts block: at most token_chunk tokens, fewer where the budget says so
            dtype = next(adapter.mlp(model, layer).experts.parameters()).dtype
            self.token_chunk = expert_chunk(adapter, _hidden(model), dtype, token_chunk, expert_pass_bytes)
            # fp32 slices of the block for the Gram product: never the whole block in fp32
            self.slice_tokens = max(1, FP32_SLICE_BYTES // (adapter.num_experts * _hidden(model) * 4))

    def release(self) -> None:
        """Drop every reference to the model's weights (layer-by-layer calibration frees each layer after it)."""
        self.model = self._experts = None

    def shared_gate_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Sums sigmoid(gate logit) of the sigmoid-gated shared expert (qwen2_moe): assembly folds the shared
        expert in with its mean gate."""
        self.shared_gate_sum += output.detach().float().sigmoid().sum(dtype=F64)

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        batch, E, k = self.batch, self.adapter.num_experts, self.adapter.top_k
        x = args[0].reshape(-1, args[0].shape[-1]).detach()
        if x.shape[0] != batch.n_tokens:
            raise RuntimeError(f"layer {self.layer}: router saw {x.shape[0]} tokens, the batch has {batch.n_tokens}")
        # The router's own (logits, top-k weights, top-k index): the model's choice itself, at no extra cost;
        # p_t is the family's score of the logits (test_capture checks both against the model for every family).
        logits, weights, index = (t.detach() for t in self.adapter.router_output(output))
        logits = logits.reshape(-1, E).float()
        probs = logits if self._returns_probs else logits.softmax(-1) if self._softmax else logits.sigmoid()
        index, weights = index.reshape(-1, k).long(), weights.reshape(-1, k).float()
        flat = index.reshape(-1)
        self.count += torch.bincount(flat, minlength=E)
        self.prob_sum += probs.sum(0, dtype=F64)
        self.prob_sum_selected.index_add_(0, flat, probs.gather(1, index).reshape(-1).to(F64))
        self.weight_sum.index_add_(0, flat, weights.reshape(-1).to(F64))
        if self.all or self.routed:  # the experts' own input (gemma4_text: a norm of the router's)
            x = self.adapter.expert_input(self.model, self.layer, x)
        if self.all:
            self._all_experts(x, index, weights)
        elif self.routed:
            self._routed_experts(x, index, weights)
        # Copies the model will never touch again (the writer reads them on its own thread).
        self.submit(self.writer.append, batch.seq, batch.pos, batch.domain, index.to("cpu", torch.int16),
                    weights.to("cpu", torch.float32, copy=True), probs.to("cpu", torch.float16) if self.store_probs
                    else None)

    def _add_routed(self, experts: torch.Tensor, norms: torch.Tensor, weights: torch.Tensor) -> None:
        self.norm_sum_routed.index_add_(0, experts, norms.to(F64))
        self.gnorm_sum_routed.index_add_(0, experts, (weights * norms).to(F64))

    def _routed_experts(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """||f_e(x_t)|| for the routed pairs: pairs sorted by expert, one matmul chain per expert on its tokens
        (the model's own grouped compute), a single host sync for the group boundaries."""
        flat = index.reshape(-1)
        experts, order = flat.sort(stable=True)
        tokens = order // index.shape[1]
        ends = torch.bincount(flat, minlength=self.adapter.num_experts).cumsum(0).tolist()
        norms = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                out = self.adapter.expert_forward(self._experts[e], x[tokens[start:end]])
                norms[start:end] = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)
            start = end
        self._add_routed(experts, norms, weights.reshape(-1)[order])

    def _all_experts(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Every expert on every token, `token_chunk` tokens at a time; routed norms come from the same block.
        Norms and the Gram matrix are computed from fp32 slices of `slice_tokens` tokens: fp32 products (half
        precision would lose digits over the c*H terms) summed in float64, no fp32 copy of the whole block."""
        E = self.adapter.num_experts
        for s in range(0, x.shape[0], self.token_chunk):
            out = self.adapter.all_expert_outputs(self.model, self.layer, x[s:s + self.token_chunk])  # [E, c, H]
            norms = torch.empty(E, out.shape[1], dtype=torch.float32, device=out.device)
            for a in range(0, out.shape[1], self.slice_tokens):
                part = out[:, a:a + self.slice_tokens].float()
                norms[:, a:a + self.slice_tokens] = torch.linalg.vector_norm(part, dim=-1)
                flat = part.reshape(E, -1)
                self.gram += (flat @ flat.T).to(F64)
            del out
            self.norm_sum_all += norms.sum(1, dtype=F64)
            self.sqnorm_sum_all += norms.to(F64).square().sum(1)
            if self.routed:
                idx = index[s:s + self.token_chunk]
                self._add_routed(idx.reshape(-1), norms.T.gather(1, idx).reshape(-1),
                                 weights[s:s + self.token_chunk].reshape(-1))

    def stats(self, n_tokens: int) -> LayerStats:
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return LayerStats(
            n_tokens=n_tokens, top_k=self.adapter.top_k, count=cpu(self.count), prob_sum=cpu(self.prob_sum),
            prob_sum_selected=cpu(self.prob_sum_selected), weight_sum=cpu(self.weight_sum),
            norm_sum_routed=cpu(self.norm_sum_routed), gnorm_sum_routed=cpu(self.gnorm_sum_routed),
            norm_sum_all=cpu(self.norm_sum_all), sqnorm_sum_all=cpu(self.sqnorm_sum_all), gram=cpu(self.gram),
        )


def _check_args(needs: Iterable[str], token_chunk: int, writer_threads: int | None) -> set[str]:
    needs = _check_needs(needs)
    if token_chunk < 1:
        raise ValueError(f"token_chunk must be >= 1, got {token_chunk}")
    if writer_threads is not None and writer_threads < 0:
        raise ValueError(f"writer_threads must be >= 0 or None, got {writer_threads}")
    return needs


def _check_needs(needs: Iterable[str]) -> set[str]:
    needs = set(needs)
    if unknown := needs - set(CAPTURES):
        raise ValueError(f"unknown capture pass(es) {sorted(unknown)}; known: {CAPTURES}")
    return needs | {"routing"}  # routing is always captured: every score divides by its counts


class _Tokens:
    """What the capture has seen so far: tokens, sequences, tokens per domain."""

    def __init__(self) -> None:
        self.n_tokens = self.n_sequences = 0
        self.by_domain: Counter[str] = Counter()

    def add(self, n_rows: int, seq_len: int, domains: list[str]) -> None:
        self.n_tokens, self.n_sequences = self.n_tokens + n_rows * seq_len, self.n_sequences + n_rows
        for d in domains:
            self.by_domain[d] += seq_len


class _Hooks:
    """Setup and teardown of one capture: per MoE layer a routing writer, a `_LayerCapture` hooked on the router
    (and on the shared expert's gate where the family has one), all writers fed through `threads`."""

    def __init__(self, threads: _WriterThreads):
        self.threads = threads
        self.layers: dict[int, _LayerCapture] = {}
        self.writers: list[RoutingWriter] = []
        self.handles: list = []

    def attach(self, model: nn.Module, adapter: Adapter, out_root: Path, needs: set[str], store_probs: bool,
               row_group_rows: int, token_chunk: int, device: torch.device, expert_pass_bytes: int) -> None:
        for slot, layer in enumerate(adapter.moe_layers):
            self.attach_layer(slot, model, adapter, layer, out_root, needs, store_probs, row_group_rows, token_chunk,
                              device, expert_pass_bytes)

    def attach_layer(self, slot: int, model: nn.Module, adapter: Adapter, layer: int, out_root: Path,
                     needs: set[str], store_probs: bool, row_group_rows: int, token_chunk: int,
                     device: torch.device, expert_pass_bytes: int) -> None:
        writer = RoutingWriter(out_root, layer, adapter.top_k, adapter.num_experts, store_probs, row_group_rows)
        self.writers.append(writer)
        self.layers[layer] = cap = _LayerCapture(model, adapter, layer, writer, partial(self.threads.submit, slot),
                                                 needs, store_probs, token_chunk, device, expert_pass_bytes)
        self.handles.append(adapter.router_module(model, layer).register_forward_hook(cap))
        if cap.shared_gate_sum is not None:
            gate = getattr(adapter.mlp(model, layer), adapter.spec.shared_gate_attr)
            self.handles.append(gate.register_forward_hook(cap.shared_gate_hook))

    def finish(self) -> None:
        """Wait for every queued routing append and publish the routing files."""
        self.threads.join()
        for writer in self.writers:
            writer.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the error being raised already says what went wrong
            self.threads.join()
        for writer in self.writers:
            writer.abort()

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _run_batches(model: nn.Module, layers: dict[int, _LayerCapture], batches: Iterable, device: torch.device,
                 bar) -> _Tokens:
    """The forward over every batch; the hooks accumulate. Only the base model runs (no LM head)."""
    seen = _Tokens()
    with torch.no_grad():
        for ids, domains in batches:
            ids = torch.as_tensor(ids, dtype=torch.long)
            B, S = ids.shape
            if len(domains) != B:
                raise ValueError(f"batch of {B} sequences has {len(domains)} domain labels")
            batch = _Batch(seen.n_sequences, B, S, list(domains))
            for cap in layers.values():
                cap.batch = batch
            Adapter.decoder(model)(input_ids=ids.to(device), use_cache=False)
            seen.add(B, S, domains)
            bar.update(B * S)
    if seen.n_tokens == 0:
        raise ValueError("no calibration tokens: the batches were empty")
    return seen


@contextlib.contextmanager
def _system_memory_pool() -> Iterator[None]:
    """pyarrow's default mimalloc pool hands freed pages back to the OS ~10 ms after a free, so each row-group flush
    (seconds apart) page-faults its working memory back in: flushes ran ~3x slower inside the capture loop than
    alone (0.16 s vs 0.05 s per 65,536-row group, 2-core demo VM). The system allocator keeps them mapped."""
    arrow_pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(arrow_pool)


def _write_outputs(out_root: Path, adapter: Adapter, layers: dict[int, _LayerCapture], seen: _Tokens,
                   needs: set[str], store_probs: bool) -> dict[int, LayerStats]:
    """Per-layer stats and meta.json beside the routing Parquet (layout in `store`)."""
    stats = {layer: cap.stats(seen.n_tokens) for layer, cap in layers.items()}
    for layer, s in stats.items():
        write_stats(out_root, layer, s)
    write_meta(out_root, {
        "model_type": adapter.model_type,
        "num_experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "moe_layers": adapter.moe_layers,
        "n_tokens": seen.n_tokens,
        "n_sequences": seen.n_sequences,
        "needs": [c for c in CAPTURES if c in needs],
        "store_probs": store_probs,
        "domains": dict(sorted(seen.by_domain.items())),  # domain -> calibration tokens
        # layer -> mean sigmoid gate of the shared expert over calibration tokens (families with a gated one)
        "shared_gate_mean": {str(layer): float(cap.shared_gate_sum) / seen.n_tokens for layer, cap in layers.items()
                             if cap.shared_gate_sum is not None},
    })
    return stats


def capture(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor | np.ndarray, list[str]]],
    out_root: str | Path,
    *,
    needs: set[str],
    store_probs: bool = False,
    row_group_rows: int = 65536,
    token_chunk: int = 4096,
    progress: bool = True,
    writer_threads: int | None = None,
    expert_pass_bytes: int = 2**30,
) -> dict[int, LayerStats]:
    """Run the teacher over `batches` of (ids [B, S], domains [B]) and write a calibration run under `out_root`.

    `needs` is a subset of `scoring.CAPTURES` (see `required_capture`); "routing" is always added. Writes
    routing Parquet, per-layer stats and meta.json (see `store`), and returns layer -> LayerStats. `out_root` is
    expected to be a temp dir that the caller renames on success; on error no routing file is published.
    `model` is a *ForCausalLM or its base model; only the base model runs (the LM head is not needed).
    `writer_threads`: background threads encoding routing row groups; None: one per usable CPU, at most one per
    MoE layer; 0: write inline, in the forward's thread. `expert_pass_bytes`: memory budget of the all-experts block
    (`expert_chunk`).
    """
    needs = _check_args(needs, token_chunk, writer_threads)
    adapter = get_adapter(model)
    if is_generic(adapter):  # a discovered family is used only once its blocks are reproduced (arch.generic)
        batches = with_verified_teacher(model, adapter, batches)
    out_root = Path(out_root)
    device = next(model.parameters()).device
    n_moe = len(adapter.moe_layers)
    if writer_threads is None:
        writer_threads = min(n_moe, len(os.sched_getaffinity(0)))
    hooks = _Hooks(_WriterThreads(writer_threads, max_pending=2 * n_moe))  # about one batch queued
    was_training = model.training
    bar = tqdm(desc="calibrate", unit="tok", unit_scale=True, disable=not progress, mininterval=1.0)
    with _system_memory_pool():
        try:
            model.eval()
            hooks.attach(model, adapter, out_root, needs, store_probs, row_group_rows, token_chunk, device,
                         expert_pass_bytes)
            seen = _run_batches(model, hooks.layers, batches, device, bar)
            hooks.finish()
        except BaseException:
            hooks.abort()
            raise
        finally:
            hooks.detach()
            model.train(was_training)
            bar.close()
    return _write_outputs(out_root, adapter, hooks.layers, seen, needs, store_probs)


def capture_layerwise(
    checkpoint: str | Path,
    batches: Iterable[tuple[torch.Tensor | np.ndarray, list[str]]],
    out_root: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    needs: set[str],
    store_probs: bool = False,
    row_group_rows: int = 65536,
    token_chunk: int = 4096,
    progress: bool = True,
    writer_threads: int | None = None,
    expert_pass_bytes: int = 2**30,
    host_limit: int | None = None,
) -> dict[int, LayerStats]:
    """`capture` of the teacher at `checkpoint` in `dtype` on `device`, holding the embeddings and one decoder
    layer at a time (calibrate.offload: layer; `layerwise`). The same hooks on the same router modules see the same
    inputs, so the routing files and stats equal `capture`'s. `host_limit`: bytes of hidden states kept in RAM before
    they spill to a memory-mapped file (None: a share of the available memory)."""
    from moe2dense.calibrate.layerwise import LayerwiseTeacher, as_batches, run_layerwise

    needs = _check_args(needs, token_chunk, writer_threads)
    batches = as_batches(batches)
    teacher = LayerwiseTeacher(checkpoint, dtype, device)
    adapter, model, out_root = teacher.adapter, teacher.model, Path(out_root)
    n_moe = len(adapter.moe_layers)
    if writer_threads is None:  # one layer is captured at a time
        writer_threads = 1
    hooks = _Hooks(_WriterThreads(writer_threads, max_pending=2 * n_moe))
    labels, seen = [], _Tokens()
    for ids, domains in batches:
        labels.append(_Batch(seen.n_sequences, *ids.shape, domains))
        seen.add(*ids.shape, domains)
    slots = {layer: slot for slot, layer in enumerate(adapter.moe_layers)}
    current: list[_LayerCapture] = []

    def on_layer(i: int, loaded: bool) -> None:
        if i not in slots:
            return
        if loaded:
            hooks.attach_layer(slots[i], model, adapter, i, out_root, needs, store_probs, row_group_rows,
                               token_chunk, device, expert_pass_bytes)
            current[:] = [hooks.layers[i]]
        else:  # the layer is done: publish its routing file now rather than hold its writer's buffer to the end
            hooks.detach()
            hooks.threads.wait()
            hooks.writers[-1].close()
            for cap in current:
                cap.release()
            current.clear()

    def on_batch(b: int) -> None:
        for cap in current:
            cap.batch = labels[b]

    with _system_memory_pool():
        try:
            run_layerwise(teacher, batches, on_batch, on_layer, host_limit=host_limit, progress=progress)
            hooks.finish()
        except BaseException:
            hooks.abort()
            raise
        finally:
            hooks.detach()
            teacher.close()
    return _write_outputs(out_root, adapter, hooks.layers, seen, needs, store_probs)


def capture_checkpoint(checkpoint: str | Path, batches: Iterable, out_root: str | Path, *, offload: str,
                       dtype: torch.dtype, device: torch.device, **kwargs) -> dict[int, LayerStats]:
    """Calibrate the teacher at `checkpoint` whole (`capture`) or layer by layer (`capture_layerwise`) as
    calibrate.offload `offload` says (auto: `layerwise.choose_offload`); `kwargs` go to either."""
    from moe2dense.calibrate.layerwise import choose_offload
    from moe2dense.teacher.load import load_frozen

    if choose_offload(offload, checkpoint, dtype, device) == "layer":
        return capture_layerwise(checkpoint, batches, out_root, dtype=dtype, device=device, **kwargs)
    kwargs.pop("host_limit", None)
    return capture(load_frozen(checkpoint, dtype, device), batches, out_root, **kwargs)


def calibration_batches(packed_path: str | Path, batch_rows: int, max_tokens: int | None = None
                        ) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(ids [n, seq_len] int64, domains) batches from a packed Parquet file, whole sequences only, stopping before
    `max_tokens` would be exceeded (None: the whole file)."""
    remaining = max_tokens
    for ids, domains in iter_packed_batches(packed_path, batch_rows):
        if remaining is not None:
            rows = min(len(ids), remaining // ids.shape[1])
            if rows == 0:
                return
            ids, domains = ids[:rows], domains[:rows]
            remaining -= ids.size
        yield ids, domains
