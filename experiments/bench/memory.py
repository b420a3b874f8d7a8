"""Peak memory of a training step, side by side, one fresh process per configuration.

    python -m experiments.bench.memory                      # both models, every configuration
    python -m experiments.bench.memory --models 130M --configs adamw_fused dct_8bit_bp

Each configuration (optimizer × model × ``update_proj_gap``) runs in its own process
(``python -m experiments.bench.memory_worker``, :mod:`experiments.bench.memory_worker` documents
the measurement and the accounting): the repo's LLaMA with random initialisation, one random
batch of 1×128 tokens, ``loss.backward(); opt.step(); opt.zero_grad()``. CPU: peak RSS per phase
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each phase, checked at start-up); CUDA
(``--device cuda``): ``torch.cuda.max_memory_allocated``, reset before each phase.

Models: LLaMA-130M with fp32 parameters and LLaMA-350M with bf16 parameters (built directly in
bf16), GaLore's recipe rank 256 on the attention and MLP linears
(``lowrank_param_groups(model, target_modules=("attn", "mlp"), rank=256)``; embeddings, norms and
the head in the plain group, whose moments follow ``moment_bits`` too).

Configurations (:data:`experiments.bench.memory_worker.OPTIMIZERS`): torch AdamW (foreach) and
AdamW(fused=True); GaLoreAdamW and DCTProjAdam, each with float moments and ``moment_bits=8``,
each standard (DCTProjAdam with its default ``residual="scaled"``) and with
``backward_projection=True`` (DCTProjAdam with ``residual="none"``, which the mode requires),
and each with ``step_in_backward=True`` (every parameter stepped in its hook, one backward pass per
step, DCTProjAdam with its default residual; ``*_sib``); the 8-bit step-in-backward rows and
AdamW(fused) also with the model's activation checkpointing (``*_ckpt``: layers recomputed in the
backward pass, so that activations do not set the peak; AdamW's peak, at its step, is unchanged).
APOLLOAdamW (rank 256, channel scaling) and APOLLOMini (rank 1, tensor scaling, scale 128) over the
same groups, 8-bit moments, step in backward, with and without checkpointing: no backward
projection (APOLLO refuses it: its update scales the full gradient), so each hook steps its weight
with the full gradient and frees it. The ``int8_*`` rows store every ``nn.Linear`` but the head in int8
(``quantize_model_weights`` after the model is built in bf16, before the optimizer, as the training
script's ``--weight_bits 8``): APOLLO-Mini with 8- or 4-bit moments and DCTProjAdam with 8-bit moments,
step in backward and checkpointing.

Phases (measured separately, each the max of its forward+backward and ``opt.step()`` peaks):

* **first step**: subspace creation, state allocation; every gradient full-size (backward
  projection has no subspace yet, so its hooks leave all gradients alone).
* **ordinary step**: step 2 (steady state: state allocated, no subspace refresh). Backward
  projection runs with ``update_proj_gap=200``; its staggered schedule (weight ``j`` refreshes
  when ``(t + ⌊j·T/W⌋) mod T = 0``) refreshes no weight at step 2 for these models (checked: the
  full projected gradients alive after backward are counted and must equal the schedule's).
  Standard projected rows run with ``update_proj_gap=2`` (so that step 3 is a refresh; step 2 is
  an ordinary step at any gap), torch AdamW has no refresh.
* **refresh step**: standard rows: step 3 (gap 2), where every projected weight refreshes, as
  every 200th step does at gap 200. Backward projection at gap 200: the run goes on to the first step
  after the first at which the staggered schedule refreshes a weight (step 3 for 350M's 168
  weights, step 4 for 130M's 84; at most ``⌈W/T⌉`` = 1 weight per step at these sizes), so the
  steady state of the recipe's gap. Torch AdamW's steps are all alike (the ratio column uses its
  ordinary step).
* **refresh stress** (backward projection, ``--stress`` configurations; DCT by default, as
  GaLore's CPU SVD of every weight at the first step takes minutes at 350M): a second process
  with ``update_proj_gap=4``, step 2, where ``⌈W/4⌉`` weights keep full gradients.

Ratios are to AdamW(fused) of the same model in the same phase (refresh phases: its ordinary
step). A LLaMA-7B table of bytes per parameter of training state (weights, gradients, optimizer
state, projection) comes from the same accounting on the meta device (nothing allocated): state
from ``projection_summary()``, gradients per the mode (full gradients; or, under backward
projection, the largest projected weight's full gradient + every accumulator + the plain
parameters' full gradients), and for the rows stepped in the backward pass with int8 weights the
same plus the activations of a 1×2048 batch with activation checkpointing
(:func:`experiments.bench.state_memory.checkpointed_activation_bytes`).

Writes ``results.md`` and ``results.json`` to ``--out`` (default ``experiments/results/memory_cpu``
on CPU); the last line printed states the best ordinary-step ratio to AdamW(fused) measured.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from experiments.bench.common import REPO, command_line, git_head, library_dirty, library_hash, load_average, machine
from experiments.bench.memory_worker import (
    DTYPES,
    OPTIMIZERS,
    TARGET_MODULES,
    expected_refreshing,
)
from experiments.bench.state_memory import meta_model, seven_b_table
from experiments.model_factory import read_model_config
from lowrank_optim import lowrank_param_groups

MIB, GB = 2**20, 10**9


@dataclass(frozen=True)
class ModelSpec:
    config: str
    dtype: str
    rank: int
    title: str


MODELS: dict[str, ModelSpec] = {
    "130M": ModelSpec("llama_130m", "fp32", 256, "LLaMA-130M fp32"),
    "350M": ModelSpec("llama_350m", "bf16", 256, "LLaMA-350M bf16"),
}
BACKWARD_GAP = 200       # the recipe's gap: ordinary steps are ordinary
STANDARD_GAP = 2         # standard rows: step 2 ordinary, step 3 a refresh of every weight
STRESS_GAP = 4
DEFAULT_STRESS = ("dct_bp", "dct_8bit_bp")
REFERENCE = "adamw_fused"
PHASES = ("first", "ordinary", "refresh", "stress")
PHASE_TITLES = {"first": "first step", "ordinary": "ordinary step", "refresh": "refresh step",
                "stress": f"refresh stress (gap {STRESS_GAP})"}


@dataclass(frozen=True)
class Run:
    model: str
    key: str
    kind: str            # "main" or "stress"
    gap: int
    steps: int


def projected_count(model: str) -> int:
    """How many weights GaLore's recipe projects in ``model`` (counted on the meta device)."""
    spec = MODELS[model]
    groups = lowrank_param_groups(meta_model(spec.config, DTYPES[spec.dtype], "native"), target_modules=TARGET_MODULES,
                                  rank=spec.rank)
    return len(groups[0]["params"])


def first_staggered_refresh(count: int, gap: int) -> int:
    """The first optimizer step after the first at which the staggered schedule refreshes a weight."""
    return next(step for step in range(2, gap + 2) if expected_refreshing(step, count, gap, True) > 0)


def plan_runs(models: list[str], keys: list[str], stress: list[str], steps: int | None = None) -> list[Run]:
    """The worker runs; ``steps``: at most this many steps per run (``--steps``: 2 keeps the first and an
    ordinary step and drops the refresh phase, for rows whose CPU step is slow, as the int8 ones)."""
    runs = []
    for model in models:
        # backward projection at gap 200: run up to the first step that refreshes a weight (≥ 3)
        backward_steps = max(3, first_staggered_refresh(projected_count(model), BACKWARD_GAP))
        for key in keys:
            spec = OPTIMIZERS[key]
            if not spec.projected:
                runs.append(Run(model, key, "main", BACKWARD_GAP, 2))
            elif spec.deferred:
                runs.append(Run(model, key, "main", BACKWARD_GAP, backward_steps))
                if key in stress:
                    runs.append(Run(model, key, "stress", STRESS_GAP, 2))
            else:
                runs.append(Run(model, key, "main", STANDARD_GAP, 3))
    if steps is not None:
        runs = [Run(r.model, r.key, r.kind, r.gap, min(r.steps, steps)) for r in runs]
    return runs


def run_worker(run: Run, args, work_dir: Path) -> dict:
    """One fresh process for ``run``; its JSON result, or ``{"error": ...}``."""
    model = MODELS[run.model]
    out = work_dir / f"{run.model}_{run.key}_{run.kind}.json"
    command = [sys.executable, "-m", "experiments.bench.memory_worker", "--model", model.config,
               "--dtype", model.dtype, "--optimizer", run.key, "--rank", str(model.rank), "--gap", str(run.gap),
               "--steps", str(run.steps), "--batch", str(args.batch), "--seq", str(args.seq),
               "--device", args.device, "--threads", str(args.threads), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=args.timeout)
    except subprocess.TimeoutExpired as error:
        return {"error": f"timed out after {args.timeout} s", "stderr": str(error.stderr or "")[-2000:],
                "command": command}
    seconds = time.perf_counter() - started
    if completed.returncode != 0 or not out.exists():
        return {"error": f"exit status {completed.returncode}", "stderr": completed.stderr[-4000:],
                "command": command, "seconds": seconds}
    result = json.loads(out.read_text(encoding="utf-8"))
    result.update(seconds=seconds, command=" ".join(command[1:]).replace(str(out), "OUT.json"))
    return result


# ------------------------------------------------------------------------------------------ phases
def select_phases(key: str, main: dict, stress: dict | None) -> dict:
    """{phase: step record (with "step", "gap")} of one configuration; absent phases omitted."""
    spec = OPTIMIZERS[key]
    phases = {}
    if "error" in main:
        return phases
    steps = main["steps"]
    phases["first"], phases["ordinary"] = steps[0], steps[1]
    if spec.projected:
        if spec.deferred:
            candidates = [s for s in steps[1:] if s["expected_refreshing"] > 0]
            if candidates:
                phases["refresh"] = max(candidates, key=lambda s: (s["expected_refreshing"], s["peak"]))
        elif len(steps) > 2:            # not with --steps 2
            phases["refresh"] = steps[2]
    if stress is not None and "error" not in stress:
        phases["stress"] = stress["steps"][1]
    for name, record in phases.items():
        record["gap"] = (stress if name == "stress" else main)["update_proj_gap"]
    return phases


def check(key: str, main: dict, stress: dict | None, phases: dict) -> list[str]:
    """What the phase separation and the hooks must satisfy; the failures."""
    problems = []
    spec = OPTIMIZERS[key]
    for result in filter(None, [main, stress]):
        if "error" in result:
            problems.append(f"worker failed: {result['error']}")
            continue
        if not result["peak_reset_verified"]:
            problems.append("VmHWM reset not verified: phase peaks are whole-run peaks")
        count = result["projected_weights"]
        for s in result["steps"]:
            if not spec.projected:
                continue
            # step in backward: every parameter stepped and freed its gradient in its hook
            want = 0 if spec.in_backward else s["expected_refreshing"] if spec.backward else count
            if s["full_projected_grads"] != want:
                problems.append(f"gap {result['update_proj_gap']} step {s['step']}: {s['full_projected_grads']} "
                                f"projected weights with full gradients after backward, expected {want}")
            if spec.in_backward and s["grad_bytes"] + s["accumulator_bytes"]:
                problems.append(f"step {s['step']}: {s['grad_bytes'] + s['accumulator_bytes']} B of gradients "
                                "or accumulators after backward under step in backward, expected 0")
            if spec.backward and s["step"] > 1 and s["expected_refreshing"] == 0 and \
                    s["accumulator_bytes"] != result["expected_accumulator_bytes"]:
                problems.append(f"step {s['step']}: accumulators {s['accumulator_bytes']} B, expected "
                                f"{result['expected_accumulator_bytes']} B (projection_summary shapes)")
            if s["peak"] < s["resident_before"]:
                problems.append(f"step {s['step']}: peak below the memory held before it")
    if spec.deferred and "ordinary" in phases and phases["ordinary"]["expected_refreshing"] != 0:
        problems.append("the ordinary step refreshes weights under the staggered schedule")
    return problems


# ------------------------------------------------------------------------------------------ render
def _mib(value) -> str:
    return "—" if value is None else f"{value / MIB:.0f}"


def ratio(value, reference) -> float | None:
    return None if value is None or not reference else value / reference


def derive(results: dict, models: list[str], keys: list[str]) -> dict:
    """{model: {key: {"phases": ..., "ratios": ..., "checks": ...}}}."""
    derived = {}
    for model in models:
        rows = {}
        for key in keys:
            main = results.get((model, key, "main"))
            if main is None:
                continue
            stress = results.get((model, key, "stress"))
            phases = select_phases(key, main, stress)
            rows[key] = {"phases": phases, "checks": check(key, main, stress, phases), "main": main,
                         "stress": stress}
        reference = rows.get(REFERENCE, {}).get("phases", {})
        ref_main = rows.get(REFERENCE, {}).get("main", {})
        for row in rows.values():
            ratios = {}
            for name, record in row["phases"].items():
                ref = reference.get("first" if name == "first" else "ordinary")
                ratios[name] = ratio(record["peak"], ref and ref["peak"])
                ratios[name + "_above_baseline"] = ratio(
                    record["peak"] - row["main"]["baseline"],
                    ref and ref["peak"] - ref_main["baseline"])
            if "whole_run_peak" in row["main"]:
                ratios["whole_run"] = ratio(row["main"]["whole_run_peak"], ref_main.get("whole_run_peak"))
            row["ratios"] = ratios
        derived[model] = rows
    return derived


def best_line(derived: dict) -> tuple[str, dict | None]:
    best = None
    for model, rows in derived.items():
        for key, row in rows.items():
            value = row["ratios"].get("ordinary")
            if not OPTIMIZERS[key].projected or value is None:
                continue
            if best is None or value < best["ratio"]:
                best = {"model": model, "key": key, "ratio": value}
    if best is None:
        return "best: nothing measured", None
    label = OPTIMIZERS[best["key"]].label
    return (f"best: {label}, {MODELS[best['model']].title}: {best['ratio']:.2f}× AdamW(fused) peak "
            "(ordinary step)"), best


def notes(derived: dict) -> list[str]:
    """Readings of the tables, computed from them."""
    out = ["## Notes (computed from the tables above)", ""]
    for model, rows in derived.items():
        title = MODELS[model].title
        values = read_model_config(MODELS[model].config)
        largest_plain = values["vocab_size"] * values["hidden_size"]
        pairs = [("dct_bp", "dct_8bit_bp"), ("galore_bp", "galore_8bit_bp"), ("dct", "dct_8bit"),
                 ("galore", "galore_8bit")]
        for flt, q in pairs:
            if flt in rows and q in rows and "ordinary" in rows[flt]["phases"] and "ordinary" in rows[q]["phases"]:
                a, b = rows[flt]["phases"]["ordinary"], rows[q]["phases"]["ordinary"]
                extra = b["components"]["transients"] - a["components"]["transients"]
                saved = a["components"]["state"] - b["components"]["state"]
                out.append(f"- {title}, {OPTIMIZERS[q].label} vs float moments, ordinary step: state "
                           f"{_mib(saved)} MiB smaller, transients {extra / MIB:+.0f} MiB "
                           f"({extra / largest_plain:+.1f} B per value of the largest plain tensor, the "
                           f"{values['vocab_size']}×{values['hidden_size']} embedding/head), peak "
                           f"{(b['peak'] - a['peak']) / MIB:+.0f} MiB. On CPU both run the PyTorch paths: the "
                           "quantized plain update steps one tensor at a time in chunks of 2^20 values, the float "
                           "one is the multi-tensor update in batches of 2^22 values.")
                break
        ref = rows.get(REFERENCE)
        for key in ("dct_8bit_bp", "dct_8bit_sib_ckpt"):     # what no transient reduction can go below
            row = rows.get(key)
            if not (ref and row and "ordinary" in row["phases"] and "ordinary" in ref["phases"]):
                continue
            r, c = ref["phases"]["ordinary"], row["phases"]["ordinary"]["components"]
            held = c["weights"] + c["gradients"] + c["state"]
            held_ref = sum(r["components"][k] for k in ("weights", "gradients", "state"))
            out.append(f"- {title}: weights + gradients + state of {OPTIMIZERS[key].label} at an ordinary "
                       f"step = {_mib(held)} MiB = {held / held_ref:.2f}× AdamW(fused)'s {_mib(held_ref)} MiB; "
                       f"with zero transients and its baseline the peak would be "
                       f"{(held + row['main']['baseline']) / r['peak']:.2f}× AdamW(fused)'s peak.")
        whole = [(OPTIMIZERS[k].label, row) for k, row in rows.items() if OPTIMIZERS[k].deferred
                 and "first" in row["phases"] and "ordinary" in row["phases"]]
        if whole:
            label, row = whole[0]
            out.append(f"- {title}: under backward projection the first step holds every full gradient (no "
                       f"subspace yet), so each backward-projection row's whole-run peak is its first step "
                       f"(e.g. {label}: {_mib(row['phases']['first']['peak'])} vs "
                       f"{_mib(row['phases']['ordinary']['peak'])} MiB at an ordinary step).")
    out.append("")
    return out


def render(meta: dict, derived: dict, seven_b: dict | None, best: str) -> str:
    out = ["# Peak memory of a training step, side by side (CPU)" if meta["device"] == "cpu"
           else "# Peak memory of a training step, side by side (CUDA)", ""]
    out += [f"Command: `{meta['command']}` (wall time {meta['wall_seconds'] / 60:.1f} min).", "",
            f"Machine: {meta['machine']}. torch {meta['torch']}, Python {meta['python']}. "
            f"Peak: {meta['peak_method']}; {meta['threads_note']}; {meta['malloc_note']}. "
            f"Load average at start / end: {meta['load_start']} / {meta['load_end']} (shared machine: "
            "times are indicative only).", "",
            f"Library state: HEAD {meta['git_head']}, sources {meta['library_hash']} (sha256 of lowrank_optim/ "
            f"and kernels/ at run time; uncommitted changes there: {meta.get('library_dirty', 'not recorded')}).",
            "", "Protocol: one fresh process per row and gap (module doc of `experiments/bench/memory.py`); "
            "random init, one random batch 1×128, `loss.backward(); opt.step(); opt.zero_grad()`. Each phase's "
            "peak is the max of its forward+backward and `opt.step()` peaks, the high-water mark reset before "
            "each. Ratios: to AdamW(fused) of the same model in the same phase (refresh phases: its ordinary "
            "step); 'above baseline' subtracts each process's own baseline (interpreter + torch + libraries "
            "after a warm-up) first. `[k]`: projected weights whose full gradient is alive after backward.", ""]
    for model, rows in derived.items():
        spec = MODELS[model]
        any_row = max((row["main"] for row in rows.values()), key=lambda r: r.get("projected_weights", -1))
        share = any_row.get("projected_parameters", 0) / max(any_row.get("parameters", 1), 1)
        out += [f"## {spec.title}: peak MiB (× AdamW(fused))", "",
                f"{any_row.get('parameters', 0):,} parameters, {any_row.get('projected_weights', 0)} projected "
                f"weights (attn+mlp, {share:.0%} of the parameters), rank {spec.rank}.", "",
                "| configuration | first step | ordinary step | refresh step | refresh stress (gap 4) | whole run | "
                "ordinary, above baseline |", "|---|---|---|---|---|---|---|"]
        for key, row in rows.items():
            if "error" in row["main"]:
                out.append(f"| {OPTIMIZERS[key].label} | failed: {row['main']['error']} | | | | | |")
                continue
            cells = []
            for name in PHASES:
                record = row["phases"].get(name)
                if record is None:
                    cells.append("—")
                    continue
                value = row["ratios"].get(name)
                count = "" if not OPTIMIZERS[key].projected else f" [{record['full_projected_grads']}]"
                gap = "" if name in ("first", "ordinary") or not OPTIMIZERS[key].projected \
                    else f" gap {record['gap']}"
                cells.append(f"{_mib(record['peak'])} ({value:.2f}×){count}{gap}")
            whole = row["main"]["whole_run_peak"]
            cells.append(f"{_mib(whole)} ({row['ratios'].get('whole_run') or 0:.2f}×)")
            above = row["ratios"].get("ordinary_above_baseline")
            cells.append("—" if above is None else
                         f"{_mib(row['phases']['ordinary']['peak'] - row['main']['baseline'])} ({above:.2f}×)")
            out.append(f"| {OPTIMIZERS[key].label} | " + " | ".join(cells) + " |")
        out += ["", f"### {spec.title}: components, MiB (weights + gradients + state + transients + baseline = peak)",
                "", "gradients = `.grad` bytes + projected accumulators alive right after backward; state = "
                "`optimizer_state_bytes` after the step; baseline = the process before the model was built; "
                "transients = the rest (activations, step temporaries, caches outside the state, allocator slack).",
                "", "| configuration | phase | [k] | weights | gradients (full + accum.) | state | transients | "
                "baseline | peak | fwd+bwd peak | step peak | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, row in rows.items():
            for name in PHASES:
                record = row["phases"].get(name)
                if record is None:
                    continue
                c = record["components"]
                base = (row["stress"] if name == "stress" else row["main"])["baseline"]
                where = f"step {record['step']}" + (
                    "" if not OPTIMIZERS[key].projected else f", gap {record['gap']}")
                out.append(
                    f"| {OPTIMIZERS[key].label} | {PHASE_TITLES[name]} ({where}) | "
                    f"{record['full_projected_grads']} | {_mib(c['weights'])} | {_mib(c['gradients'])} "
                    f"({_mib(record['grad_bytes'])} + {_mib(record['accumulator_bytes'])}) | {_mib(c['state'])} | "
                    f"{_mib(c['transients'])} | {_mib(base)} | {_mib(record['peak'])} | "
                    f"{_mib(record['peak_forward_backward'])} | {_mib(record['peak_step'])} | "
                    f"{record['seconds_forward_backward'] + record['seconds_step']:.0f} |")
        problems = [(key, p) for key, row in rows.items() for p in row["checks"]]
        out += ["", "Checks (phase separation and hooks: full projected gradients after backward = the staggered "
                "schedule's count, accumulators = projection_summary's shapes at a step without refresh, each "
                "step's peak ≥ what it held before): " + ("all passed." if not problems else "")]
        out += [f"- {OPTIMIZERS[key].label}: {p}" for key, p in problems]
        out.append("")
    out += notes(derived)
    if seven_b is not None:
        out += [f"## LLaMA-7B: bytes per parameter of training state (meta device, bf16 weights, rank "
                f"{seven_b['rank']}, gap {seven_b['gap']})", "",
                "State from `projection_summary()` (what the first step allocates; the split into moments and "
                "projection uses `moment_state_bytes`); gradients per the mode. GB = 10^9 B.", "",
                "| method | weights | gradients | optimizer state (moments) | projection | total B/param | total GB |"
                " gradients counted |", "|---|---|---|---|---|---|---|---|"]
        for row in seven_b["rows"]:
            n = row["parameters"]
            out.append(f"| {row['label']} | {row['weights'] / n:.3f} | {row['gradients'] / n:.3f} | "
                       f"{row['state'] / n:.3f} | {row['projection'] / n:.3f} | **{row['total'] / n:.3f}** | "
                       f"{row['total'] / GB:.1f} | {row['grads_note']}{'; ' + row['note'] if row['note'] else ''} |")
        galore = next(r for r in seven_b["rows"] if r["label"].startswith("8-bit GaLore per-layer"))
        dct = next(r for r in seven_b["rows"] if r["label"].startswith("DCTProjAdam 8-bit + backward"))
        default_side = [r for r in seven_b["rows"] if "reverse_std" not in r["label"]]
        best_row = min(default_side, key=lambda r: r["total"])
        larger = [r for r in seven_b["rows"] if "reverse_std" in r["label"]]
        n = galore["parameters"]
        out += ["", f"Weights + 8-bit GaLore state = "
                f"{(galore['weights'] + galore['state'] + galore['projection']) / n:.3f} B/param (P "
                f"{galore['projection'] / GB:.2f} GB). With backward projection stepped in opt.step() the "
                f"accumulators stay (exact accumulation and clipping): DCTProjAdam 8-bit "
                f"{dct['total'] / n:.3f} B/param, of which bf16 accumulators {dct['accumulators'] / n:.3f}. "
                f"Least with the default sides: {best_row['label']}, {best_row['total'] / n:.3f} B/param"
                + "".join(f"; {r['label']}: {r['total'] / n:.3f} B/param (its quality is measured in the README, "
                          "section Memory)" for r in larger) + ".", ""]
        acts = seven_b.get("with_activations")
        if acts:
            a = acts["activations"]
            out += [f"### LLaMA-7B: the same accounting plus the activations of a {acts['batch']}×{acts['seq']} batch "
                    "with activation checkpointing", "",
                    "Activations from `experiments.bench.state_memory.checkpointed_activation_bytes` (its docstring "
                    "has the formula): the checkpointed layer inputs "
                    f"{a['checkpoints'] / GB:.3f} GB + max(the loss at the top of the backward pass "
                    f"{a['logits'] / GB:.3f} GB, one recomputed layer in its backward "
                    f"{(a['layer_saved'] + a['layer_backward']) / GB:.3f} GB + the int8 hook's fp32 ΔW "
                    f"{a['step'] / GB:.3f} GB) = {a['peak'] / GB:.3f} GB with int8 weights. GB = 10^9 B.", "",
                    "| method | weights + gradients + state + projection, GB | activations, GB | total GB |",
                    "|---|---|---|---|"]
            for row in acts["rows"]:
                out.append(f"| {row['label']} | {row['state_total'] / GB:.2f} | {row['activations'] / GB:.2f} | "
                           f"**{row['total'] / GB:.2f}** |")
            out.append("")
    out += [best]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ main
def rerender(path: Path, recompute_7b: bool = False) -> None:
    """results.md again from a results.json this script wrote (same tables, no measurement);
    ``recompute_7b``: the LLaMA-7B accounting (meta device) again with the current library, into both files."""
    payload = json.loads(path.read_text(encoding="utf-8"))
    by_config = {spec.config: label for label, spec in MODELS.items()}
    results = {}
    for run in payload["runs"]:
        label = run.get("model_label") or by_config[run["model"]]
        results[label, run["optimizer"], run["kind"]] = run
    models = [m for m in MODELS if any(key[0] == m for key in results)]
    keys = [k for k in OPTIMIZERS if any(key[1] == k for key in results)]
    derived = derive(results, models, keys)
    best, _ = best_line(derived)
    if recompute_7b:
        payload["seven_b"] = seven_b_table()
        path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    text = render(payload["meta"], derived, payload.get("seven_b"), best)
    (path.parent / "results.md").write_text(text, encoding="utf-8")
    print(text, end="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--stress", nargs="*", default=list(DEFAULT_STRESS),
                        help="backward-projection configurations that also get the gap-4 refresh stress run")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes at a time (each its own process)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker (0: cores // jobs)")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=65536,
                        help="MALLOC_MMAP_THRESHOLD_ for the workers (glibc: buffers of this size or more are "
                             "mapped and returned to the OS when freed, so RSS follows the live tensors; 0: "
                             "glibc's default dynamic threshold)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    parser.add_argument("--steps", type=int, default=None, choices=(2, 3),
                        help="at most this many steps per worker (2: first and ordinary step, no refresh phase, for "
                             "rows whose CPU step is slow)")
    parser.add_argument("--skip_7b", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--from_json", type=Path, default=None,
                        help="re-render results.md next to this results.json (no measurement)")
    parser.add_argument("--recompute_7b", action="store_true",
                        help="with --from_json: redo the LLaMA-7B accounting (meta device) with the current library")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        rerender(args.from_json, args.recompute_7b)
        return
    if args.threads == 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    out_dir = args.out or REPO / "experiments" / "results" / f"memory_{args.device}"
    command = command_line("experiments.bench.memory", argv)
    started, load_start = time.perf_counter(), load_average()

    runs = plan_runs(args.models, args.configs, [k for k in args.stress if OPTIMIZERS[k].backward], args.steps)
    results: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory(prefix="memory_bench_") as work:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_worker, run, args, Path(work)): run for run in runs}
            for future in concurrent.futures.as_completed(futures):
                run = futures[future]
                result = future.result()
                results[run.model, run.key, run.kind] = result
                peaks = ", ".join(f"{s['peak'] / MIB:.0f}" for s in result.get("steps", []))
                print(f"{run.model} {run.key} ({run.kind}, gap {run.gap}): "
                      f"{result.get('error') or 'peaks ' + peaks + ' MiB'} [{result.get('seconds', 0):.0f} s]",
                      flush=True)
    seven_b = None if args.skip_7b else seven_b_table()
    derived = derive(results, args.models, args.configs)
    best, best_record = best_line(derived)
    first = next((r for r in results.values() if "error" not in r), {})
    meta = {
        "command": command, "device": args.device, "wall_seconds": time.perf_counter() - started,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "torch": torch.__version__, "python": platform.python_version(),
        "peak_method": first.get("peak_method", "n/a") + (
            ", reset verified in every worker" if all(r.get("peak_reset_verified") for r in results.values())
            else ", reset NOT verified in some worker"),
        "threads_note": f"{args.jobs} worker(s) at a time, {args.threads} torch thread(s) each",
        "malloc_note": (f"workers run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (RSS follows live "
                        "tensors; glibc's default dynamic threshold keeps freed buffers resident and adds "
                        "history-dependent slack)" if args.malloc_mmap_threshold else "glibc malloc defaults"),
        "load_start": load_start, "load_end": load_average(), "git_head": git_head(), "library_hash": library_hash(),
        "library_dirty": library_dirty(),
        "protocol": {"backward_gap": BACKWARD_GAP, "standard_gap": STANDARD_GAP, "stress_gap": STRESS_GAP,
                     "batch": args.batch, "seq": args.seq, "models": {k: asdict(MODELS[k]) for k in args.models}},
    }
    text = render(meta, derived, seven_b, best)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text, encoding="utf-8")
    payload = {
        "meta": meta, "best": best_record, "best_line": best, "seven_b": seven_b,
        "configurations": {model: {key: {"label": OPTIMIZERS[key].label, "phases": row["phases"],
                                         "ratios": row["ratios"], "checks": row["checks"]}
                                   for key, row in rows.items()} for model, rows in derived.items()},
        "runs": [{**r, "model_label": m, "optimizer": k, "kind": kind} for (m, k, kind), r in sorted(results.items())],
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(text, end="")          # its last line is the best ratio


if __name__ == "__main__":
    main()
