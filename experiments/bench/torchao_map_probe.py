"""torchao's AdamW4bit with the lowest level of its signed 4-bit map set to −1.0 (``LOWBIT_4BIT.md`` §8).

    python -m experiments.bench.torchao_map_probe COMPARE_FLAGS...

torchao's signed 4-bit map (``create_dynamic_map(True, 3, 4)``) has 16 levels from −0.8875 to +1.0: a block
whose largest first moment in magnitude is negative stores it shrunk by 11%, where a positive one is kept
exactly. The library's signed map has 15 levels, ±1.0 at both ends. This runs
``experiments.results.compare`` with the flags given, torchao's lowest signed level replaced by −1.0 and
nothing else changed, to measure whether that asymmetry is part of torchao's lead over the library's
4-bit AdamW at 3.3M.
"""
from __future__ import annotations


def patch_signed_map() -> tuple[float, ...]:
    """Replace torchao's signed 4-bit map (what ``OptimState4bit.zeros`` reads) by itself with the lowest
    level at −1.0; returns the new levels."""
    import torchao.optim.subclass_4bit as subclass_4bit

    levels = list(subclass_4bit.get_qmap_signed())
    if not -0.9 < levels[0] < -0.85:
        raise RuntimeError(f"torchao's signed 4-bit map starts at {levels[0]}, not at −0.8875: the probe was "
                           "written for torchao 0.18's map")
    patched = (-1.0, *levels[1:])
    subclass_4bit.get_qmap_signed = lambda: patched
    return patched


def main(argv: list[str] | None = None) -> None:
    from experiments.results import compare

    patch_signed_map()
    compare.main(argv, module="experiments.bench.torchao_map_probe")


if __name__ == "__main__":
    main()
