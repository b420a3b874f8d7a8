"""Adam's two moments of one tensor, as the optimizer state stores them: float or 8/4-bit.

A parameter group's ``moment_bits`` (``None``, ``8`` or ``4``) chooses the storage, for projected
moments (``m×r`` / ``r×n``) and plain parameters alike, and its ``moment_block_size`` the values per
scale (None: 256 at 8 bits, 128 at 4; :mod:`lowrank_optim.quantization` has the scheme). The state
keys are::

    float:      exp_avg, exp_avg_sq                              (moments_dtype, or the parameter's)
    quantized:  exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales
                (uint8 codes and fp32 block scales; blocks along the rank slots)

Plain tensors, so checkpoints load with ``torch.load(weights_only=True)``; under FSDP2, DTensors
sharded like the parameter (float moments, and codes and scales alike:
:mod:`lowrank_optim.quantization.sharded`). Whether a moment is
quantized is decided from the parameter's *global* moment shape (fewer than 4096 values stay in
float, :func:`~lowrank_optim.quantization.moment_bits_for`), so sharding never changes the
precision.

One protocol, :class:`Moments` (:mod:`.base`), over the two storages: :class:`FloatMoments`
(:mod:`.float_moments`) and :class:`QuantizedMoments` (:mod:`.quantized_moments`);
:class:`MomentSpec` (what a parameter's plan resolves once) or :meth:`Moments.of` picks the storage.
"""
from .base import Moments, MomentSpec
from .float_moments import FLOAT_KEYS, FloatMoments
from .quantized_moments import QUANTIZED_KEYS, QuantizedMoments

__all__ = ["FLOAT_KEYS", "QUANTIZED_KEYS", "FloatMoments", "MomentSpec", "Moments", "QuantizedMoments"]
