"""Which moments are quantized (global-shape rule) and the bytes they take."""
import math

import pytest
import torch

from lowrank_optim.quantization import (
    MIN_QUANTIZED_NUMEL,
    check_moment_bits,
    default_block_size,
    moment_bits_for,
    moment_state_bytes,
    quantize,
    quantized_zeros,
)


def test_small_tensors_stay_in_float():
    assert MIN_QUANTIZED_NUMEL == 4096
    assert moment_bits_for((4096,), 8) == 8 and moment_bits_for((64, 64), 4) == 4
    assert moment_bits_for((4095,), 8) is None and moment_bits_for((64, 63), 4) is None
    assert moment_bits_for((64, 8), 8) is None            # a 64×64 weight's rank-8 moment: 512 values
    assert moment_bits_for(torch.Size([32000, 512]), 8) == 8
    assert moment_bits_for((1 << 20,), None) is None


def test_the_rule_reads_the_global_shape_not_a_shard():
    """A 4096-value parameter sharded over 4 ranks holds 1024 values per rank; its precision is
    decided by the global shape, so every mesh gives the same answer. A tensor is refused."""
    global_shape = torch.Size([64, 64])
    shard = torch.empty(16, 64)
    assert moment_bits_for(global_shape, 8) == 8
    with pytest.raises(TypeError, match="global shape"):
        moment_bits_for(shard, 8)


def test_invalid_moment_bits_are_named():
    check_moment_bits(None)
    for bad in (16, 2, True, "8"):
        with pytest.raises(ValueError, match=f"Invalid moment_bits: {bad!r}"):
            moment_bits_for((4096,), bad)
    assert default_block_size(8) == 256 and default_block_size(4) == 128


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("bits,max_ratio", [(8, 0.27), (4, 0.14)])
def test_projected_moments_bytes_against_fp32(bits, max_ratio):
    """A 4096×1024 weight at rank 256, right side: moments 4096×256. 8 bits: per moment
    4096·256 code bytes + (4096/256)·256 fp32 scales = 1,064,960 B; both moments 0.2539× the fp32
    pair (8,388,608 B). 4 bits: 2048·256 + 32·256·4 = 557,056 B, 0.1328×."""
    shape = (4096, 256)
    fp32_pair = 2 * moment_state_bytes(shape, None)
    assert fp32_pair == 2 * 4 * 4096 * 256
    pair = 2 * moment_state_bytes(shape, bits, "columns")
    per_moment = 4096 * 256 * bits // 8 + (4096 // default_block_size(bits)) * 256 * 4
    assert pair == 2 * per_moment
    assert pair / fp32_pair <= max_ratio
    # the same from tensors actually allocated: zero state, and state quantized from data
    zeros = (*quantized_zeros(shape, bits, True, "columns"), *quantized_zeros(shape, bits, False, "columns"))
    data = torch.randn(shape)
    quantized = (*quantize(data, bits, True, "columns"), *quantize(data * data, bits, False, "columns"))
    fp32_tensors = (torch.zeros(shape), torch.zeros(shape))
    assert _nbytes(*zeros) == _nbytes(*quantized) == pair
    assert _nbytes(*quantized) / _nbytes(*fp32_tensors) <= max_ratio
    print(f"{bits}-bit projected moments: {pair / fp32_pair:.4f}x fp32")


def test_bytes_of_float_moments_and_other_layouts():
    assert moment_state_bytes((1000,), None, float_dtype=torch.bfloat16) == 2000
    assert moment_state_bytes((37, 301), 4, "rows") == 37 * 151 + 37 * 3 * 4
    assert moment_state_bytes((61, 71), 8, "flat") == 4331 + 17 * 4
    assert moment_state_bytes((61, 71), 8, "flat", block_size=64) == 4331 + 68 * 4


# LLaMA-7B (ALGORITHMS.md §6): hidden 4096, intermediate 11008, 32 layers, vocabulary 32000
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 4096, 11008, 32, 32000


def _llama_7b_shapes():
    per_layer = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)] + [(HIDDEN,)] * 2
    return [(VOCAB, HIDDEN), (VOCAB, HIDDEN), (HIDDEN,)] + per_layer * LAYERS


def test_llama_7b_memory_accounting_without_allocating():
    """Moment bytes of 8-bit AdamW on every LLaMA-7B parameter (flat blocks), and of 8-bit GaLore
    at rank 1024 (attn/mlp projected on their smaller side, the rest plain 8-bit), checked against
    the closed form: 8-bit codes + one fp32 scale per 256 values of a slot."""
    shapes = _llama_7b_shapes()
    assert sum(math.prod(s) for s in shapes) == 6_738_415_616
    adam8 = sum(2 * moment_state_bytes(s, moment_bits_for(s, 8), "flat") for s in shapes)
    expected = sum(2 * (math.prod(s) + 4 * math.ceil(math.prod(s) / 256)) for s in shapes)
    assert adam8 == expected
    fp32 = sum(2 * moment_state_bytes(s, None) for s in shapes)
    assert adam8 / fp32 == pytest.approx(0.2539, abs=1e-4)

    rank, galore8 = 1024, 0
    for shape in shapes:
        if len(shape) == 2 and VOCAB not in shape:
            rows, cols = shape
            moment, layout = ((rows, rank), "columns") if rows >= cols else ((rank, cols), "rows")
            length = rows if layout == "columns" else cols          # rank slots of this length
            assert moment_state_bytes(moment, 8, layout) == rank * length + 4 * rank * math.ceil(length / 256)
        else:
            moment, layout = shape, "flat"
        galore8 += 2 * moment_state_bytes(moment, moment_bits_for(moment, 8), layout)
    print(f"LLaMA-7B moments: fp32 {fp32 / 2**30:.2f} GiB, 8-bit AdamW {adam8 / 2**30:.2f} GiB, "
          f"8-bit GaLore r1024 {galore8 / 2**30:.2f} GiB")
    assert galore8 < 0.35 * adam8
