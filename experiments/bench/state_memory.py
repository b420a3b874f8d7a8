"""Optimizer-state bytes of LLaMA-60M … 7B per method, computed on the meta device (nothing allocated).

    python -m experiments.bench.state_memory                         # markdown tables on stdout
    python -m experiments.bench.state_memory --out experiments/results/lowbit_cpu/state_memory.md

Models: the GaLore configs in ``experiments/configs/`` (vocab 32000, untied head), built as Hugging
Face ``LlamaForCausalLM`` (``--impl hf``, default) or the repo's own ``experiments.model.Llama``
(``--impl native``) on the meta device, with fp32 and/or bf16 parameters (``--dtypes``). Projected
methods use GaLore's recipe: ``lowrank_param_groups(model, target_modules=("attn", "mlp"), rank=r)``
with r = 128/256/256/512/1024 for 60M/130M/350M/1B/7B (attention and MLP linears; embeddings,
norms and the head stay in plain AdamW, whose moments follow ``moment_bits`` too).

Each method's bytes are counted twice, and the two counts must agree (the script fails otherwise):

* ``library``: ``optimizer.projection_summary().state_bytes`` of the optimizer built over the meta
  model (what its first step allocates);
* ``analytic``: this file's own count from the documented scheme (``lowrank_optim.quantization``):
  a float moment is ``numel × itemsize`` (the parameter's dtype); a quantized one (``numel ≥ 4096``)
  is, per slot of ``L`` values, ``⌈L·bits/8⌉`` code bytes plus ``⌈L/B⌉`` fp32 scales (B = 256 at 8
  bits, 128 at 4; slots: the ``r`` columns of a right-projected ``m×r`` moment, the ``r`` rows of a
  left ``r×n`` one, one slot for a plain parameter); GaLore's ``P`` is ``r × min(m, n)`` values in
  the parameter's dtype; the DCT keeps ``r`` int64 indices plus a 4-byte residual scalar.

Not optimizer state and not counted: the DCT basis matrices the DCT projector caches per distinct
size (listed in a note), SVD work buffers, gradients, weights.
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from lowrank_optim.kernels.layout import layout_for
from torch import nn

from experiments.bench.common import command_line, write_text
from experiments.bench.memory_worker import accumulator_shapes
from experiments.bench.memory_worker import build_optimizer as build_configuration
from experiments.methods import create_optimizer, info_for
from experiments.model_factory import read_model_config
from lowrank_optim import APOLLOAdamW, DCTProjAdam, lowrank_param_groups
from lowrank_optim.modules import ALL_LINEAR, select_linear_modules
from lowrank_optim.quantization import moment_bits_for, moment_state_bytes
from lowrank_optim.registry import plain_adamw

# (label, config, GaLore recipe rank)
MODELS: dict[str, tuple[str, int]] = {
    "60M": ("llama_60m", 128),
    "130M": ("llama_130m", 256),
    "350M": ("llama_350m", 256),
    "1B": ("llama_1b", 512),
    "7B": ("llama_7b", 1024),
}
TARGET_MODULES = ("attn", "mlp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCK_SIZES = {8: 256, 4: 128}
MIN_QUANTIZED_NUMEL = 4096
GIB, GB = 2**30, 10**9
HEAD = "lm_head.weight"       # the output head of the native LLaMA (experiments.model)


@dataclass(frozen=True)
class MethodSpec:
    """A row of the table: an optimizer of ``experiments.methods`` (registry or peer) at its moment bits."""

    label: str
    optimizer: str
    bits: int | None

    @property
    def projected(self) -> bool:
        return bool(info_for(self.optimizer).projection_keys)


METHODS: dict[str, MethodSpec] = {
    "adamw": MethodSpec("AdamW, float moments (2 × itemsize B/param)", "lowrank_plain_adamw", None),
    "adamw_8bit": MethodSpec("AdamW, 8-bit moments (library plain path)", "adamw8bit", 8),
    "adamw_4bit": MethodSpec("AdamW, 4-bit moments (library plain path)", "adamw4bit", 4),
    "galore": MethodSpec("GaLoreAdamW, float moments", "galore_adamw", None),
    "galore_8bit": MethodSpec("GaLoreAdamW, moment_bits=8", "galore_adamw", 8),
    "galore_adamw8bit": MethodSpec("GaLoreAdamW8bit", "galore_adamw8bit", 8),
    "galore_4bit": MethodSpec("GaLoreAdamW, moment_bits=4", "galore_adamw", 4),
    "dct": MethodSpec("DCTProjAdam, float moments", "dct_adamw", None),
    "dct_8bit": MethodSpec("DCTProjAdam, moment_bits=8", "dct_adamw", 8),
    "dct_4bit": MethodSpec("DCTProjAdam, moment_bits=4", "dct_adamw", 4),
}

# Anchors from the papers (as printed; not computed here). GaLore Table 2, bf16, optimizer states only.
ANCHOR_STATES_GB = {
    "full-rank AdamW": {"60M": 0.23, "130M": 0.51, "350M": 1.37, "1B": 5.20},
    "GaLore": {"60M": 0.13, "130M": 0.28, "350M": 0.54, "1B": 1.78},
}


# ------------------------------------------------------------------------------------------ models
def meta_model(config: str, dtype: torch.dtype, impl: str = "hf", values: dict | None = None) -> nn.Module:
    """The LLaMA of ``config`` (a name in experiments/configs or a path; or ``values``) on the meta device."""
    values = dict(values if values is not None else read_model_config(config))
    with torch.device("meta"):
        return build_model(values, impl).to(dtype)


def build_model(values: dict, impl: str) -> nn.Module:
    """A LLaMA of the JSON-config ``values``: HF ``LlamaForCausalLM`` or the repo's ``Llama``."""
    if impl == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**values))
    if impl == "native":
        from experiments.model import Llama, LlamaConfig

        return Llama(LlamaConfig.from_dict(values))
    raise ValueError(f"unknown impl {impl!r}; expected hf or native")


def projected_weights(model: nn.Module, rank: int) -> list[tuple[str, nn.Parameter]]:
    """The weights GaLore's recipe projects: ``lowrank_param_groups``' first group."""
    return list(lowrank_param_groups(model, target_modules=TARGET_MODULES, rank=rank)[0]["params"])


# ------------------------------------------------------------------------------------------ optimizers
def build_optimizer(model: nn.Module, key: str, rank: int) -> torch.optim.Optimizer:
    """The optimizer of method ``key`` over ``model`` (meta or real), as the tables count it:
    projected methods over GaLore's recipe, the plain path over every named parameter."""
    spec = METHODS[key]
    params = (lowrank_param_groups(model, target_modules=TARGET_MODULES, rank=rank) if spec.projected
              else model.named_parameters())
    return create_optimizer(spec.optimizer, params, moment_bits=spec.bits)


# ------------------------------------------------------------------------------------------ counting
def moment_bytes(shape: tuple[int, ...], layout: str, bits: int | None, float_itemsize: int) -> int:
    """Bytes of one moment of ``shape`` (this file's own count of the documented scheme)."""
    numel = math.prod(shape)
    if bits is None or numel < MIN_QUANTIZED_NUMEL:
        return numel * float_itemsize
    if layout == "columns":
        slots, length = shape[1], shape[0]
    elif layout == "rows":
        slots, length = shape[0], shape[1]
    else:
        slots, length = 1, numel
    return slots * (math.ceil(length * bits / 8) + math.ceil(length / BLOCK_SIZES[bits]) * 4)


@dataclass(frozen=True)
class StateBytes:
    """One method on one model: the analytic parts and the library's total."""

    projected_moments: int
    projection: int
    plain_moments: int
    library: int
    parameters: int

    @property
    def total(self) -> int:
        return self.projected_moments + self.projection + self.plain_moments


def analytic_state_bytes(model: nn.Module, key: str, rank: int) -> tuple[int, int, int]:
    """(moments of projected weights, projection state, moments of plain parameters), counted here."""
    spec = METHODS[key]
    projected = {} if not spec.projected else {id(p): p for _, p in projected_weights(model, rank)}
    moments_projected = projection = moments_plain = 0
    for param in model.parameters():
        itemsize = param.element_size()
        if id(param) not in projected:
            moments_plain += 2 * moment_bytes(tuple(param.shape), "flat", spec.bits, itemsize)
            continue
        m, n = param.shape
        side = "right" if m >= n else "left"
        shape, layout = ((m, rank), "columns") if side == "right" else ((rank, n), "rows")
        moments_projected += 2 * moment_bytes(shape, layout, spec.bits, itemsize)
        projection += rank * min(m, n) * itemsize if spec.optimizer.startswith("galore") else rank * 8 + 4
    return moments_projected, projection, moments_plain


def state_bytes(model: nn.Module, key: str, rank: int, *, check: bool = True) -> StateBytes:
    """Method ``key``'s optimizer-state bytes on ``model``: analytic parts and the library's count
    (``projection_summary``; before a step: what the first step allocates). With ``check``, raise
    if they differ, or if the projected parameters are not exactly the recipe's."""
    optimizer = build_optimizer(model, key, rank)
    summary = optimizer.projection_summary()
    parts = analytic_state_bytes(model, key, rank)
    result = StateBytes(*parts, library=summary.state_bytes, parameters=sum(p.numel() for p in model.parameters()))
    if check:
        expected = set() if not METHODS[key].projected else {name for name, _ in projected_weights(model, rank)}
        got = {row.name for row in summary if row.projected}
        if got != expected:
            raise AssertionError(f"{key}: projected {sorted(got ^ expected)[:4]} … differ from the recipe's")
        if result.total != result.library:
            raise AssertionError(
                f"{key}: analytic {result.total:,} B != library projection_summary {result.library:,} B")
    return result


def dct_basis_bytes(model: nn.Module, rank: int, dtype: torch.dtype) -> dict[int, int]:
    """Distinct DCT sizes of the projected weights → bytes of the DCT matrices the projector caches
    outside the optimizer state: ``C`` in the gradient dtype plus a float64 host copy per size
    (lowrank_optim.projectors.dct_basis), not counting the Triton path's column-major copy."""
    sizes = sorted({min(p.shape) for _, p in projected_weights(model, rank)})
    return {size: size * size * (torch.empty((), dtype=dtype).element_size() + 8) for size in sizes}


# ------------------------------------------------------------------------------------------ training state at 7B
def cached_dct_bytes(optimizer: DCTProjAdam, summary) -> int:
    """The DCT matrices a step of ``optimizer`` caches (``basis="cached"`` groups): per compressed
    size, ``C`` in the gradient's dtype (projection, GEMM scoring) and in ``N``'s dtype (the weight
    update: fp32 for quantized moments), once when the two agree. Triton's column-major copies
    replace these one for one (:mod:`lowrank_optim.projectors.dct`)."""
    copies = set()
    params = [(group, param) for group in optimizer.param_groups for param in group["params"]]
    for row, (group, param) in zip(summary, params, strict=True):     # the summary lists them in this order
        if not row.projected or group["basis"] != "cached":
            continue
        size = row.shape[1] if row.side == "right" else row.shape[0]
        update_dtype = torch.float32 if group["moment_bits"] else group["moments_dtype"] or param.dtype
        copies |= {(size, param.dtype), (size, update_dtype)}
    return sum(size * size * dtype.itemsize for size, dtype in copies)


def cached_random_projection_bytes(optimizer: APOLLOAdamW, summary) -> int:
    """The ``P`` (``k×r``, the gradient's dtype) of the current seed that the random projector keeps per
    projected weight of a ``proj="random"``, ``basis="cached"`` group, outside the optimizer state
    (:mod:`lowrank_optim.projectors.random`); the state itself holds the seed (``basis="generated"``:
    nothing else)."""
    total = 0
    params = [(group, param) for group in optimizer.param_groups for param in group["params"]]
    for row, (group, param) in zip(summary, params, strict=True):
        if row.projected and group["proj"] == "random" and group["basis"] == "cached":
            size = row.shape[1] if row.side == "right" else row.shape[0]
            total += size * row.rank * param.element_size()
    return total


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s bf16 weights with every ``nn.Linear`` but the head stored in int8, as
    ``--weight_bits 8`` stores them (:func:`lowrank_optim.weights.quantize_model_weights`): an
    ``m×n`` weight is ``m·n`` int8 codes plus ``m`` bf16 scales; every other parameter 2 bytes a value."""
    int8 = {id(module.weight): module.weight for _, module in select_linear_modules(model, ALL_LINEAR)}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in int8)
    return sum(w.numel() + 2 * w.shape[0] for w in int8.values()) + 2 * rest


def checkpointed_activation_bytes(values: dict, seq: int = 2048, batch: int = 1, int8_weights: bool = True) -> dict:
    """Peak activation bytes of one training step of the repo's LLaMA (``experiments.model``, bf16,
    ``activation_checkpointing = True``: every decoder layer recomputed in its backward) at ``batch×seq``
    tokens, as :mod:`experiments.bench.memory_worker` steps it (loss on ``logits.float()``), stepped in the
    backward pass (each gradient stepped and freed in its hook). With ``t = batch·seq`` tokens, ``d``
    hidden, ``f`` intermediate, ``V`` vocabulary, ``h`` heads, ``L`` layers, in bytes::

        peak = 2·L·t·d + max(logits, layer)
        logits = t·(12·V + 8·d)
        layer  = t·(30·d + 14·f + 4·h) + 4·d·f

    * ``2·L·t·d``: the checkpointed input of every layer, bf16, alive until that layer's backward (the
      peak of either branch is at the top of the backward pass, where all ``L`` are alive).
    * ``logits``: the loss at the top of the backward pass: the fp32 log-softmax output cross-entropy
      saves (``4·t·V``), its incoming gradient (``4·t·V``, dense) and its outgoing gradient (``4·t·V``)
      (the forward's ``2 + 4 + 4`` of bf16 logits, their fp32 copy and the log-softmax output is less);
      plus the final RMSNorm's saved fp32 input, bf16 normalized values and output (``8·t·d``).
    * ``layer``: one layer recomputed in its backward (attention through SDPA's flash kernels: no
      ``s×s`` matrix, a ``4·h`` B/token fp32 log-sum-exp), what it saves per token: two RMSNorms ``2 ×
      (4d + 2d + 2d)`` (fp32 input, bf16 normalized, the output the linears save), rotated ``q``, ``k``,
      ``v`` and the attention output ``4 × 2d``, ``o_proj``'s contiguous input ``2d`` (a copy on CPU,
      where SDPA returns heads-major) = ``26d``; the MLP's gate, SiLU, up and product ``4 × 2f = 8f``.
      Then the temporaries of its backward at the MLP: the incoming gradient and its scaled copy
      ``4d``, the gradients of the product, SiLU and up outputs ``6f``. Then the step in the hook of
      the largest weight (``d×f``): with ``int8_weights`` its update ``ΔW`` formed full-size in fp32
      (``4·d·f``, docs/int8-weights.md; ``0`` otherwise, the bf16 path steps in place).

    Not counted here: the gradient alive at a time (one parameter's, the accounting's "gradients" term:
    ≤ the ``V×d`` embedding's, while a layer's backward holds at most a ``d×f`` one) and the
    dequantized bf16 copy of an int8 weight in its ``F.linear`` (``2·d·f`` at most, not alive with the
    hook's ``ΔW``); the rotary ``cos``/``sin`` buffers (``2·L·P·(d/h)·2`` B at ``P`` positions);
    allocator slack. Checked against the CPU peak of small cases (experiments/results/INT8.md)."""
    d, f, vocab = values["hidden_size"], values["intermediate_size"], values["vocab_size"]
    layers, heads = values["num_hidden_layers"], values["num_attention_heads"]
    tokens = batch * seq
    checkpoints = 2 * layers * tokens * d
    logits = tokens * (12 * vocab + 8 * d)
    layer_saved = tokens * (26 * d + 8 * f + 4 * heads)
    layer_backward = tokens * (4 * d + 6 * f)
    step = 4 * d * f if int8_weights else 0
    layer = layer_saved + layer_backward + step
    return {"seq": seq, "batch": batch, "checkpoints": checkpoints, "logits": logits, "layer_saved": layer_saved,
            "layer_backward": layer_backward, "step": step, "layer": layer,
            "peak": checkpoints + max(logits, layer)}


def seven_b_activations(table: dict, seq: int = 2048, batch: int = 1) -> dict:
    """The 7B accounting (:func:`seven_b_table`) plus the activations of one ``batch×seq`` step with
    activation checkpointing (:func:`checkpointed_activation_bytes`), for the rows stepped in the backward
    pass with int8 weights, their bf16-weight counterparts for comparison, and the bf16 recipe with the
    head at rank 1 (the 7B goal's, ``docs/apollo.md``)."""
    values = read_model_config(table["config"])
    labels = ("APOLLO-Mini, 8-bit moments, step in backward", "APOLLO-Mini, 4-bit moments, step in backward",
              "APOLLO-Mini, 8-bit moments, step in backward, head at rank 1")
    rows = []
    for row in table["rows"]:
        int8 = row["label"].startswith("int8 weights + ")
        if not int8 and row["label"] not in labels:
            continue
        acts = checkpointed_activation_bytes(values, seq, batch, int8_weights=int8)
        rows.append({"label": row["label"], "parameters": row["parameters"], "state_total": row["total"],
                     "activations": acts["peak"], "total": row["total"] + acts["peak"]})
    return {"seq": seq, "batch": batch, "activations": checkpointed_activation_bytes(values, seq, batch),
            "rows": rows}


def seven_b_table(config: str = "llama_7b", rank: int = 1024, gap: int = 200) -> dict:
    """Bytes per parameter of training state (weights, gradients, optimizer state, projection) on the
    meta device, bf16 weights and gradients, for the configurations of ``python -m
    experiments.bench.memory`` (:data:`experiments.bench.memory_worker.OPTIMIZERS`) at the recipe's gap."""
    rows = []

    def add(label, optimizer_of, grads_mode, note="", int8_weights=False):
        model = meta_model(config, torch.bfloat16, "native")   # a fresh model each: hooks belong to one optimizer
        params = list(model.parameters())
        numel = sum(p.numel() for p in params)
        weights = int8_weight_bytes(model) if int8_weights else numel * 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer, projected = optimizer_of(model)
        summary = optimizer.projection_summary()
        state = summary.state_bytes
        projection = 0
        for row in summary:
            if not row.projected:
                continue
            m, n = row.shape
            shape = (m, row.rank) if row.side == "right" else (row.rank, n)
            group = optimizer.param_groups[0]
            bits = moment_bits_for(shape, group["moment_bits"])
            moments = 2 * moment_state_bytes(shape, bits, layout_for(row.side), block_size=group["moment_block_size"],
                                             float_dtype=torch.bfloat16)
            projection += row.state_bytes - moments
        subspaces = projection                      # held in the optimizer state (indices, P)
        if isinstance(optimizer, DCTProjAdam):
            projection += cached_dct_bytes(optimizer, summary)
        if isinstance(optimizer, APOLLOAdamW):      # P of the current seed, kept by the projector (not state)
            projection += cached_random_projection_bytes(optimizer, summary)
        projected_ids = {id(p) for p in projected}
        plain_grads = sum(p.numel() * 2 for p in params if id(p) not in projected_ids)
        accumulators = 0
        if grads_mode == "full":
            grads, grads_note = numel * 2, "every gradient, bf16"
        elif grads_mode == "per_layer":
            largest = max(p.numel() for p in projected) * 2
            accumulators = sum(math.prod(shape) * 2 for shape in accumulator_shapes(optimizer))
            grads = largest + accumulators + plain_grads
            refreshing = math.ceil(len(projected) / gap)
            grads_note = (f"largest projected weight's gradient {largest / GB:.3f} GB + accumulators "
                          f"{accumulators / GB:.2f} GB + plain parameters' {plain_grads / GB:.2f} GB; a staggered "
                          f"refresh step adds ≤ ⌈{len(projected)}/{gap}⌉ = {refreshing} full gradients "
                          f"(≤ {refreshing * largest / numel:.3f} B/param)")
        else:  # "hook": GaLore's per-layer script steps in the hook: one gradient of any parameter at a time
            largest = max(p.numel() for p in params) * 2
            grads, grads_note = largest, f"one parameter's gradient at a time (the largest, {largest / GB:.2f} GB)"
        rows.append({"label": label, "parameters": numel, "weights": weights, "gradients": grads,
                     "accumulators": accumulators,
                     "state": state - subspaces, "projection": projection, "grads_note": grads_note, "note": note})

    def plain(bits=None, moments_dtype=None):
        return lambda model: (plain_adamw(model.named_parameters(), moment_bits=bits, moments_dtype=moments_dtype), [])

    def projected(key):
        return lambda model: build_configuration(model, key, rank, gap)

    add("AdamW, fp32 moments", plain(moments_dtype=torch.float32), "full",
        "library plain path (= torch AdamW's moments; torch adds a 4-byte step per tensor)")
    add("AdamW, bf16 moments", plain(), "full", "as above, moments in the weights' dtype")
    add("8-bit AdamW-style (library plain path, moment_bits=8)", plain(bits=8), "full",
        "create_optimizer(\"adamw8bit\", model.named_parameters())")
    add(f"GaLoreAdamW r={rank}, bf16 (P in bf16)", projected("galore"), "full")
    add("8-bit GaLore per-layer: GaLoreAdamW moment_bits=8 + backward_projection", projected("galore_8bit_bp"),
        "per_layer")
    add("DCTProjAdam 8-bit + backward projection (residual none)", projected("dct_8bit_bp"), "per_layer")
    add("8-bit GaLore, step in backward: GaLoreAdamW moment_bits=8, step_in_backward=True",
        projected("galore_8bit_sib"), "hook", "accumulation 1 (each parameter steps in its hook)")
    add("DCTProjAdam 8-bit, step in backward (residual scaled)", projected("dct_8bit_sib"), "hook",
        "accumulation 1; projection = the cached DCT matrices (per compressed size: bf16 for the projection, "
        "fp32 for the weight update)")
    add("DCTProjAdam 8-bit, step in backward (residual scaled), basis='generated'",
        lambda model: build_configuration(model, "dct_8bit_sib", rank, gap, basis="generated"), "hook",
        "as above, no DCT matrix stored: the r selected columns computed at each use (a transient of the size "
        "of P, like the gradient); projection = the indices")

    add("DCTProjAdam 8-bit in blocks of 2048, step in backward (residual scaled), basis='generated'",
        lambda model: build_configuration(model, "dct_8bit_sib", rank, gap, basis="generated", moment_block_size=2048),
        "hook", "as above, moment_block_size=2048 (the 8-bit optimizers paper's block; one fp32 scale per 2048 "
        "values instead of 256)")
    add("DCTProjAdam 8-bit, step in backward, proj_side='reverse_std', basis='generated'",
        lambda model: build_configuration(model, "dct_8bit_sib", rank, gap, proj_side="reverse_std", basis="generated"),
        "hook", "the larger side compressed: moments of r·min(m, n) values (a cached basis would add C of 4096 and "
        "11008: 0.123 B/param)")

    def apollo_mini(head_rank=None, **kwargs):
        """APOLLO-Mini over the named parameters (its own rule: rank 1 on every 2-D weight but the embedding
        and head, which stay plain AdamW with the same moment bits), stepped in the backward pass;
        ``head_rank``: the output head in a group of its own at that rank (projected too)."""
        def build(model):
            named = list(model.named_parameters())
            params = named if head_rank is None else [
                {"params": [(name, p) for name, p in named if name != HEAD]},
                {"params": [(name, p) for name, p in named if name == HEAD], "rank": head_rank}]
            optimizer = create_optimizer("apollo_mini", params, lr=1e-3, update_proj_gap=gap,
                                         step_in_backward=True, **kwargs)
            return optimizer, [p for p in model.parameters() if optimizer.plan_of(p).projected]
        return build

    add("APOLLO-Mini, 8-bit moments, step in backward", apollo_mini(moment_bits=8), "hook",
        "accumulation 1 (the hook has the full gradient APOLLO scales); rank 1, tensor scale: the 8-bit moments "
        "are nearly all the plain embedding's and head's; projection = the seeds and each weight's k×1 P of the "
        "current seed, which the projector keeps outside the state")
    add("APOLLO-Mini, 8-bit moments in blocks of 2048, step in backward", apollo_mini(moment_bits=8,
                                                                                       moment_block_size=2048),
        "hook", "as above, moment_block_size=2048")
    add("APOLLO-Mini, 4-bit moments, step in backward", apollo_mini(moment_bits=4), "hook",
        "as above, 4-bit moments (the plain embedding and head; quality: experiments/results/APOLLO.md)")
    add("APOLLO-Mini, 8-bit moments, step in backward, head at rank 1", apollo_mini(head_rank=1, moment_bits=8),
        "hook", "as the 8-bit row, the output head projected at rank 1 too (its moments 2 × 32000 values instead "
        "of 2 × 131M; the embedding stays plain AdamW; quality: experiments/results/APOLLO.md)")
    int8_note = ("weights: every nn.Linear but the head as int8 codes + one bf16 scale per row "
                 "(quantize_model_weights), embedding, head and norms in bf16; gradients stay bf16")
    add("int8 weights + APOLLO-Mini, 8-bit moments, step in backward", apollo_mini(moment_bits=8), "hook",
        int8_note, int8_weights=True)
    add("int8 weights + APOLLO-Mini, 4-bit moments, step in backward", apollo_mini(moment_bits=4), "hook",
        int8_note + "; 4-bit moments (the plain embedding and head) with the square-root map of v",
        int8_weights=True)
    add("int8 weights + DCTProjAdam 8-bit, step in backward (residual scaled), basis='generated'",
        lambda model: build_configuration(model, "dct_8bit_sib", rank, gap, basis="generated"), "hook",
        int8_note, int8_weights=True)
    for row in rows:
        row["total"] = row["weights"] + row["gradients"] + row["state"] + row["projection"]
    table = {"config": config, "rank": rank, "gap": gap, "rows": rows}
    table["with_activations"] = seven_b_activations(table)
    return table


# ------------------------------------------------------------------------------------------ tables
def _gib(value: int) -> str:
    return f"{value / GIB:.3f}"


def measure(models: list[str], dtypes: list[str], impl: str, keys: list[str]) -> dict:
    """{(dtype, model): {"params": N, "projected": N_proj, "methods": {key: StateBytes}, "dct_basis": {...}}}."""
    results = {}
    for dtype_name in dtypes:
        for label in models:
            config, rank = MODELS[label]
            model = meta_model(config, DTYPES[dtype_name], impl)
            results[dtype_name, label] = {
                "params": sum(p.numel() for p in model.parameters()),
                "projected": sum(p.numel() for _, p in projected_weights(model, rank)),
                "layers": len(projected_weights(model, rank)),
                "rank": rank,
                "methods": {key: state_bytes(model, key, rank) for key in keys},
                "dct_basis": dct_basis_bytes(model, rank, DTYPES[dtype_name]),
            }
    return results


def _method_table(results: dict, dtype_name: str, models: list[str], keys: list[str], cell) -> list[str]:
    """A table with one row per method and one column per model: ``cell(key, methods of the model)``."""
    by_model = [results[dtype_name, label]["methods"] for label in models]
    rows = ["| method | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for key in keys:
        label = METHODS[key].label.replace("itemsize", str(DTYPES[dtype_name].itemsize))
        rows.append(f"| {label} | " + " | ".join(cell(key, methods) for methods in by_model) + " |")
    return rows


def render(results: dict, models: list[str], dtypes: list[str], keys: list[str], impl: str, command: str) -> str:
    lines = [
        "# Optimizer-state memory, LLaMA 60M–7B (computed here, meta device)",
        "",
        f"Command: `{command}`. Models: `experiments/configs/llama_*.json` as "
        f"{'Hugging Face LlamaForCausalLM' if impl == 'hf' else 'experiments.model.Llama'} (vocab 32000, "
        "untied head). Projected methods: `lowrank_param_groups(model, target_modules=(\"attn\", \"mlp\"), rank=r)`, "
        "GaLore's ranks. Bytes are `projection_summary().state_bytes` (what the first step allocates), "
        "equal to this script's own analytic count for every cell (checked). GiB = 2^30 bytes; "
        "B/param = state bytes / all parameters.",
        "",
        "| model | parameters | projected weights (attn+mlp) | of which projected | rank |",
        "|---|---|---|---|---|",
    ]
    first = dtypes[0]
    for label in models:
        row = results[first, label]
        lines.append(f"| {label} | {row['params']:,} | {row['layers']} | {row['projected'] / row['params']:.1%} "
                     f"| {row['rank']} |")
    for dtype_name in dtypes:
        table = dict(results=results, dtype_name=dtype_name, models=models, keys=keys)
        lines += ["", f"## {dtype_name} parameters (float moments in {dtype_name}; quantized moments: uint8 codes + "
                  f"fp32 block scales; GaLore's P in {dtype_name})", "", "State GiB (bytes/param):", ""]
        lines += _method_table(**table, cell=lambda key, methods: (
            f"{_gib(methods[key].total)} ({methods[key].total / methods[key].parameters:.2f})"))
        lines += ["", "Ratio to AdamW with float moments in the same dtype:", ""]
        lines += _method_table(**table, cell=lambda key, methods: (
            f"{methods[key].total / methods['adamw'].total:.3f}" if "adamw" in keys else "n/a"))
        lines += ["", f"Breakdown ({dtype_name}), GiB: projected weights' moments + projection state (GaLore P / "
                  "DCT indices) + plain parameters' moments (embeddings, head, norms):", ""]
        lines += _method_table(**table, cell=lambda key, methods: (
            f"{_gib(methods[key].projected_moments)} + {_gib(methods[key].projection)} + "
            f"{_gib(methods[key].plain_moments)}"))
        basis = "; ".join(
            f"{label}: " + ", ".join(f"size {size}: {nbytes / 2**20:.0f} MiB" for size, nbytes in
                                     results[dtype_name, label]["dct_basis"].items())
            for label in models)
        lines += ["", f"Not in the state (DCTProjAdam, {dtype_name}): the cached DCT matrices, one `C` per distinct "
                  f"size in the gradient dtype plus its float64 host copy, shared by all layers: {basis}."]
    if "bf16" in dtypes:
        anchor_models = [label for label in models if label in ANCHOR_STATES_GB["GaLore"]]
        lines += ["", "## Side by side with the anchors (bf16)", "",
                  "Paper rows are as printed in GaLore Table 2 (\"GB\", bf16, optimizer states only); "
                  "computed rows are this script's, in GB = 10^9 B and GiB = 2^30 B.", "",
                  "| row | source | " + " | ".join(anchor_models) + " |", "|---|---|" + "---|" * len(anchor_models)]
        for name, key in (("full-rank AdamW", "adamw"), ("GaLore", "galore")):
            lines.append(f"| {name} states | **anchor**: GaLore Table 2 | "
                         + " | ".join(f"{ANCHOR_STATES_GB[name][m]:.2f} GB" for m in anchor_models) + " |")
            if key in keys:
                lines.append(f"| {METHODS[key].label.replace('itemsize', '2')} | computed here | " + " | ".join(
                    f"{results['bf16', m]['methods'][key].total / GB:.2f} GB / "
                    f"{results['bf16', m]['methods'][key].total / GIB:.2f} GiB" for m in anchor_models) + " |")
            if key == "galore" and key in keys:
                moments_only = [results["bf16", m]["methods"][key].total - results["bf16", m]["methods"][key].projection
                                for m in anchor_models]
                lines.append("| GaLoreAdamW, float moments, P left out (moments only) | computed here | " + " | ".join(
                    f"{value / GB:.2f} GB / {value / GIB:.2f} GiB" for value in moments_only) + " |")
        for key in ("galore_adamw8bit", "dct", "dct_8bit", "dct_4bit"):
            if key in keys:
                lines.append(f"| {METHODS[key].label} | computed here | " + " | ".join(
                    f"{results['bf16', m]['methods'][key].total / GB:.2f} GB / "
                    f"{results['bf16', m]['methods'][key].total / GIB:.2f} GiB" for m in anchor_models) + " |")
        if "7B" in models and "galore_adamw8bit" in keys:
            sb = results["bf16", "7B"]["methods"]["galore_adamw8bit"]
            lines += ["", "8-bit anchors (MEMORY.md; whole-training memory, not optimizer state alone, so not "
                      "comparable cell by cell):", "",
                      "| anchor (paper) | value | computed here (state only, bf16) |", "|---|---|---|",
                      f"| 8-bit GaLore per-layer, r 1024, 7B: bf16 P (GaLore §5.5 [A]) | 1.88 GB | GaLoreAdamW8bit P: "
                      f"{sb.projection / GB:.2f} GB |",
                      f"| 8-bit GaLore per-layer, r 1024, 7B: whole memory (GaLore Table 3) | 22.0 GB | "
                      f"GaLoreAdamW8bit state: {sb.total / GB:.2f} GB |"]
            for label, anchor in (("350M", (4.5, 3.5)), ("1B", (16.3, 11.8)), ("7B", (67.4, 29.4))):
                if label in models and {"adamw", "adamw_8bit"} <= set(keys):
                    fp32 = results.get(("fp32", label))
                    saving = "" if fp32 is None else (
                        f"AdamW fp32 − 8-bit moments: "
                        f"{(fp32['methods']['adamw'].total - fp32['methods']['adamw_8bit'].total) / GB:.1f} GB; ")
                    bf16 = results["bf16", label]["methods"]
                    saving += f"bf16 − 8-bit: {(bf16['adamw'].total - bf16['adamw_8bit'].total) / GB:.1f} GB"
                    lines.append(f"| SLTrain Fig. 3, {label}: Adam {anchor[0]} GB vs 8-bit Adam {anchor[1]} GB "
                                 f"(difference {anchor[0] - anchor[1]:.1f} GB [A]) | {anchor[0]} / {anchor[1]} GB | "
                                 f"state saving {saving} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.state_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--impl", default="hf", choices=("hf", "native"))
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    command = command_line("experiments.bench.state_memory", argv)
    results = measure(args.models, args.dtypes, args.impl, args.methods)
    text = render(results, args.models, args.dtypes, args.methods, args.impl, command)
    if args.out is not None:
        write_text(args.out, text)
    print(text)


__all__ = ["METHODS", "MODELS", "analytic_state_bytes", "build_optimizer", "meta_model", "state_bytes"]

if __name__ == "__main__":
    main()
