"""The library's 4-bit moments with torchao's signed 4-bit map for ``m`` (``LOWBIT_4BIT.md`` §9).

    python -m experiments.bench.library_map_probe COMPARE_FLAGS...

The library's signed 4-bit map has 15 levels, ±1.0 at both ends and one code never written; torchao
0.18's (``create_dynamic_map(True, 3, 4)``) uses all 16: the same levels with −1.0 replaced by −0.8875,
and +0.8875. Simulated at 3.3M, torchao's published scheme with its own map reproduces torchao's real
runs, and with the library's map it does not. This runs ``experiments.results.compare`` with the
library's 4-bit first moment on torchao's map (the levels of
:data:`experiments.bench.lowbit_ablation.TORCHAO_SIGNED_4BIT_LEVELS`) and nothing else changed — the
square-root map and stochastic rounding of ``v``, the blocks, the kernels — to measure whether the map
is what the library's 4-bit AdamW lacks. A probe, not a library option: the stored codes would mean
other levels, a state format of their own.
"""
from __future__ import annotations

from experiments.bench.lowbit_ablation import TORCHAO_SIGNED_4BIT_LEVELS


def patch_signed_4bit_map() -> None:
    """Make the 4-bit signed map torchao's, wherever the library reads the map; call before any 4-bit
    codebook is built (they are cached per process)."""
    from lowrank_optim.quantization import maps, reference

    if maps._codebook.cache_info().currsize:
        raise RuntimeError("a codebook was already built in this process: patch the map first")
    library_map = maps.quantization_map

    def quantization_map(bits: int, signed: bool):
        if (bits, signed) == (4, True):
            return TORCHAO_SIGNED_4BIT_LEVELS.clone()
        return library_map(bits, signed)

    maps.quantization_map = quantization_map
    reference.quantization_map = quantization_map


def main(argv: list[str] | None = None) -> None:
    from experiments.results import compare

    patch_signed_4bit_map()
    compare.main(argv, module="experiments.bench.library_map_probe")


if __name__ == "__main__":
    main()
