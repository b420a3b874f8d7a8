"""Ahead-of-time compilation of every Triton kernel of the package for real GPUs, without one.

The interpreter (``TRITON_INTERPRET=1``, how the other kernel tests run on CPU) executes kernels
in NumPy and checks none of what the GPU compiler enforces: ``tl.dot``'s shape and dtype rules,
layouts, register and shared-memory budgets. Here every ``@triton.jit`` kernel of
``lowrank_optim.kernels``, for the constexpr combinations its launcher uses and for the smallest
and the largest of its autotune configs, goes through Triton's whole NVIDIA pipeline (TTIR, TTGIR,
LLVM, PTX, then cubin by the ``ptxas`` that ships with Triton) for sm80 (A100) and sm90 (H100),
and its shared memory is checked against the target's per-block limit (a config over it would
only be skipped by the autotuner, but the smallest one must fit).

The kernels are defined when their module is imported, and the other kernel test modules set
``TRITON_INTERPRET=1`` while pytest collects them, so the compilation runs in subprocesses with
that variable removed: this file is also their script (``python test_kernels_compile.py 80``).
Each gets a fresh Triton cache so that nothing is skipped as already compiled.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")

# Per-block shared memory limits (opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TIMEOUT_S = 600

# (module, kernel attribute, its pointer dtypes, its float scalars, constexprs, compile options)
# per compiled variant. Scalars not named as floats are i32. Pointer dtypes follow the launchers:
# low-rank tensors and moments fp32 or bf16, weights fp32 or bf16, indices int64, codes uint8.
# Autotuned kernels take their options (warps, stages) from their smallest and largest configs.
_MOMENT_POINTERS = dict(grad_ptr="fp32", exp_avg_in_ptr="fp32", exp_avg_sq_in_ptr="fp32", exp_avg_out_ptr="fp32",
                        exp_avg_sq_out_ptr="fp32", update_ptr="fp32", source_slots_ptr="i64",
                        slot_bias_correction1_ptr="fp32", slot_sqrt_bias_correction2_ptr="fp32", slot_eps_ptr="fp32")
_MOMENT_FLOATS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "bias_correction1",
                  "sqrt_bias_correction2")
_GEMM_POINTERS = dict(a_ptr="fp32", basis_ptr="fp32", partial_ptr="fp32", index_ptr="i64", out_ptr="fp32")
_WEIGHT_POINTERS = dict(weight_ptr="fp32", update_ptr="fp32", basis_ptr="fp32", index_ptr="i64", grad_ptr="fp32",
                        low_rank_grad_ptr="fp32", coefficients_ptr="fp32")
_BF16_WEIGHT = dict(weight_ptr="bf16", grad_ptr="bf16", low_rank_grad_ptr="bf16")
_BF16_LOW_RANK = dict(update_ptr="bf16", basis_ptr="bf16", low_rank_grad_ptr="bf16")


def _moment(pointers=None, **constexprs):
    return ("moment_update_triton", "_adam_moment_kernel", dict(_MOMENT_POINTERS, **(pointers or {})),
            _MOMENT_FLOATS, constexprs, None)


def _weight(pointers=None, precision="ieee", **constexprs):
    return ("weight_update_triton", "_projected_weight_update_kernel", dict(_WEIGHT_POINTERS, **(pointers or {})),
            ("decay", "step"), dict(constexprs, PRECISION=precision), None)


_QUANTIZED_POINTERS = dict(
    grad_ptr="fp32", update_ptr="fp32", m_codes_ptr="u8", m_scales_ptr="fp32", v_codes_ptr="u8", v_scales_ptr="fp32",
    m_codes_out_ptr="u8", m_scales_out_ptr="fp32", v_codes_out_ptr="u8", v_scales_out_ptr="fp32",
    m_levels_ptr="fp32", m_midpoints_ptr="fp32", v_levels_ptr="fp32", v_midpoints_ptr="fp32",
    source_slots_ptr="i64", bias_correction1_ptr="fp32", sqrt_bias_correction2_ptr="fp32", eps_ptr="fp32")


_NEAREST_V = dict(V_STOCHASTIC=False, V_POWER=1)
_STOCHASTIC_V = dict(V_STOCHASTIC=True, V_POWER=2)


def _quantized(pointers=None, **constexprs):
    return ("quantized_moment_update_triton", "_quantized_adam_kernel", dict(_QUANTIZED_POINTERS, **(pointers or {})),
            _MOMENT_FLOATS, constexprs, dict(num_warps=4, enable_fp_fusion=False))


def _int8_weight(scales, delta):
    return ("int8_weight_update_triton", "_int8_weight_update_kernel",
            dict(codes_ptr="i8", scales_ptr=scales, delta_ptr=delta, seed_ptr="i64"), ("a", "b"),
            dict(SCALE_BF16=scales == "bf16", BLOCK_N=2048), dict(num_warps=4, enable_fp_fusion=False))


def _apollo_norms(dtype):
    return ("channel_scaling_triton", "_channel_squared_norms_kernel", dict(grad_ptr=dtype, partial_ptr="fp32"), (),
            dict(BLOCK_C=32, BLOCK_L=128), dict(num_warps=4))


def _channel_scaling(dtype, factors):
    return ("channel_scaling_triton", "_scaled_weight_update_kernel",
            dict(weight_ptr=dtype, grad_ptr=dtype, factors_ptr="fp32"), ("decay", "neg_step"),
            dict(FACTORS=factors, BLOCK_M=16, BLOCK_N=256), dict(num_warps=4))


CASES = [
    # Kernel 1: plain, remap, per-slot corrections with the remap, for both slot layouts; bf16
    # gradient with fp32 moments (bf16 weights), and bf16 moments.
    _moment(HAS_REMAP=False, PER_SLOT=False, SLOTS_ARE_COLUMNS=True),
    _moment(dict(grad_ptr="bf16"), HAS_REMAP=True, PER_SLOT=False, SLOTS_ARE_COLUMNS=False),
    _moment(HAS_REMAP=True, PER_SLOT=True, SLOTS_ARE_COLUMNS=True),
    _moment(dict(grad_ptr="bf16", exp_avg_in_ptr="bf16", exp_avg_sq_in_ptr="bf16", exp_avg_out_ptr="bf16",
                 exp_avg_sq_out_ptr="bf16", update_ptr="bf16"), HAS_REMAP=True, PER_SLOT=True, SLOTS_ARE_COLUMNS=False),
    # Kernel 2: scores (l1, l2) and the gather-GEMM, fp32 (IEEE and TF32) and bf16 operands.
    ("column_select_triton", "_column_scores_kernel", _GEMM_POINTERS, (), dict(SQUARE=True, PRECISION="ieee"), None),
    ("column_select_triton", "_column_scores_kernel", dict(_GEMM_POINTERS, a_ptr="bf16", basis_ptr="bf16"), (),
     dict(SQUARE=False, PRECISION="tf32"), None),
    ("column_select_triton", "_gather_matmul_kernel", _GEMM_POINTERS, (), dict(PRECISION="tf32"), None),
    ("column_select_triton", "_gather_matmul_kernel", dict(_GEMM_POINTERS, a_ptr="bf16", basis_ptr="bf16",
                                                           out_ptr="bf16"), (), dict(PRECISION="ieee"), None),
    # Kernel 3: the scaled residual for gathered (DCT) and dense (GaLore) bases on both sides, the
    # plain update for each basis and side once; fp32 everywhere, bf16 weights and gradient with
    # fp32 moments (TF32), bf16 N.
    *(_weight(HAS_INDEX=has_index, BASIS_ON_LEFT=left, RESIDUAL=True) for has_index in (True, False)
      for left in (True, False)),
    _weight(HAS_INDEX=True, BASIS_ON_LEFT=False, RESIDUAL=False),
    _weight(HAS_INDEX=False, BASIS_ON_LEFT=True, RESIDUAL=False),
    _weight(_BF16_WEIGHT, precision="tf32", HAS_INDEX=True, BASIS_ON_LEFT=False, RESIDUAL=True),
    _weight(_BF16_LOW_RANK, HAS_INDEX=False, BASIS_ON_LEFT=True, RESIDUAL=True),
    # The quantized moment update (not autotuned): 8-bit and 4-bit (two nibble lanes) codes, with
    # the options its launcher passes (4 warps, no FP fusion).
    # A 4-bit v is rounded stochastically (Philox at its bits), an 8-bit one to the nearest level.
    _quantized(BITS=8, BLOCK=256, BLOCK_SLOTS=8, HAS_REMAP=True, PER_SLOT=True, **_NEAREST_V),
    _quantized(dict(grad_ptr="bf16"), BITS=4, BLOCK=64, BLOCK_SLOTS=32, HAS_REMAP=False, PER_SLOT=False,
               **_STOCHASTIC_V),
    # APOLLO's two passes (not autotuned; the launcher's tiles and warps): channel norms of an fp32
    # and a bf16 gradient, the scaled update per row, per column and by one factor, fp32/bf16/fp16.
    _apollo_norms("fp32"),
    _apollo_norms("bf16"),
    _channel_scaling("fp32", "rows"),
    _channel_scaling("bf16", "columns"),
    _channel_scaling("fp16", "tensor"),
    # The int8 weight update (not autotuned; the launcher's options, its largest column block):
    # fp32 scales and update, bf16 scales (rounded up in the kernel) and a bf16 update.
    _int8_weight("fp32", "fp32"),
    _int8_weight("bf16", "bf16"),
]
# Configs over a target's shared memory, which the autotuner skips there (it times a launch that
# raises OutOfResources as infinitely slow): on A100 the largest tile of the dense (GaLore)
# residual update with fp32 operands, whose pipelined N, R and P tiles take 224 KiB. Patterns
# are constexpr subsets; anything else over a limit fails the test, as would a smallest config.
OVER_LIMIT = {
    80: [("_projected_weight_update_kernel", dict(HAS_INDEX=False, RESIDUAL=True, PRECISION="ieee",
                                                  BLOCK_M=128, BLOCK_N=128, BLOCK_K=64))],
    90: [],
}


def _extreme_configs(configs):
    """The smallest and the largest config by tile volume (product of the block sizes)."""
    def volume(config):
        product = 1
        for value in config.kwargs.values():
            product *= value
        return product, config.num_warps, config.num_stages
    ordered = sorted(configs, key=volume)
    return [ordered[0], ordered[-1]]


def _signature(fn, pointers, floats, aligned):
    """``ASTSource`` signature (every parameter: ``*dtype``, ``i32``, ``fp32`` or ``constexpr``) and
    the divisibility attributes the JIT would give: 16-byte aligned pointers always (fresh torch
    allocations), integers divisible by 16 when ``aligned`` (the usual LLM shapes)."""
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _kernels():
    """Every kernel defined in the ``*_triton`` modules, by ``(module, name)``."""
    import triton

    from lowrank_optim import kernels
    found = {}
    for module_info in pkgutil.iter_modules(kernels.__path__):
        if not module_info.name.endswith("_triton"):
            continue
        module = importlib.import_module(f"lowrank_optim.kernels.{module_info.name}")
        for name, value in vars(module).items():
            # Kernels (launched from the host) are autotuned or named *_kernel; other jit
            # functions are device helpers, compiled within the kernels that call them.
            if isinstance(value, triton.runtime.Autotuner) or (
                    isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel")):
                found[(module_info.name, name)] = value
    return found


def compile_all(capability: int) -> dict:
    """Compile every case for ``cuda`` sm``capability``; ``{"compiled": [...], "seconds": ...}``."""
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    target = GPUTarget("cuda", capability, 32)
    kernels = _kernels()
    uncovered = set(kernels) - {(module, name) for module, name, *_ in CASES}
    if uncovered:
        raise RuntimeError(f"kernels without a compile case: {sorted(uncovered)}")
    compiled = []
    for module, name, pointers, floats, constexprs, case_options in CASES:
        kernel = kernels[module, name]
        autotuned = isinstance(kernel, triton.runtime.Autotuner)
        fn = kernel.fn if autotuned else kernel
        # The smallest config with generic integers, the largest with 16-divisible ones (a plain
        # jit kernel: its one configuration, both ways).
        for aligned, config in zip((False, True), _extreme_configs(kernel.configs) if autotuned else (None, None)):
            blocks = config.kwargs if config is not None else {}
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages) if autotuned else case_options
            unmatched = {p.name for p in fn.params if p.is_constexpr} ^ {*constexprs, *blocks}
            if unmatched:
                raise RuntimeError(f"{name}: constexprs {sorted(unmatched)} not matched by its compile case")
            signature, attrs = _signature(fn, pointers, floats, aligned)
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs={**constexprs, **blocks},
                                               attrs=attrs)
            began = time.perf_counter()
            binary = triton.compile(source, target=target, options=options)
            compiled.append(dict(kernel=name, constexprs={**constexprs, **blocks}, options=options,
                                 pointers=pointers, must_fit=not (autotuned and aligned), shared=binary.metadata.shared,
                                 cubin_bytes=len(binary.asm["cubin"]), seconds=time.perf_counter() - began))
    return dict(capability=capability, compiled=compiled, seconds=time.perf_counter() - start)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """``{capability: (returncode, stdout, stderr)}``: both targets compiled concurrently, one
    subprocess each, with a clean environment."""
    processes = {}
    try:
        for capability in SHARED_MEMORY_LIMIT:
            env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
            env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp(f"triton_cache_sm{capability}"))
            # Triton 3.9's default (FMA contraction on), set to silence its deprecation warning.
            env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
            processes[capability] = subprocess.Popen([sys.executable, __file__, str(capability)], env=env,
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outputs = {capability: process.communicate(timeout=TIMEOUT_S) for capability, process in processes.items()}
        return {capability: (processes[capability].returncode, *output) for capability, output in outputs.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()


def _matches(entry: dict, pattern: tuple[str, dict]) -> bool:
    kernel, constexprs = pattern
    return entry["kernel"] == kernel and all(entry["constexprs"][key] == value for key, value in constexprs.items())


@pytest.mark.parametrize("capability", list(SHARED_MEMORY_LIMIT))
def test_every_kernel_compiles_for_the_gpu(reports, capability):
    returncode, stdout, stderr = reports[capability]
    assert returncode == 0, f"compilation for sm{capability} failed:\n{stderr[-6000:]}"
    report = json.loads(stdout.strip().splitlines()[-1])
    assert len(report["compiled"]) == 2 * len(CASES)
    assert all(entry["cubin_bytes"] > 0 for entry in report["compiled"])
    over = [entry for entry in report["compiled"] if entry["shared"] > SHARED_MEMORY_LIMIT[capability]]
    assert not [entry for entry in over if entry["must_fit"]], "a smallest (or only) config must fit"
    unexpected = [entry for entry in over if not any(_matches(entry, p) for p in OVER_LIMIT[capability])]
    assert not unexpected, f"over {SHARED_MEMORY_LIMIT[capability]} B of shared memory: {unexpected}"
    assert all(any(_matches(entry, p) for entry in over) for p in OVER_LIMIT[capability]), "OVER_LIMIT is stale"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    print(json.dumps(compile_all(int(sys.argv[1]))))
