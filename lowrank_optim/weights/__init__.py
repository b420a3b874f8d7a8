r"""Weights stored in int8 for training (issue #23, stage 1: the weight store).

One call converts a model (:func:`quantize_model_weights`); its forward then dequantizes one
layer at a time, the gradients are those of the dequantized weight ``Ŵ`` (ordinary tensors in
the weight's dtype), and an optimizer steps each int8 weight with one call,
:func:`int8_update_` (``W ← SR(a·Ŵ − b·ΔW)``, unbiased stochastic rounding, reproducible noise).
:func:`dequantize_model_weights` gives an ordinary model back (``save_pretrained`` works on it).

Format
------
An ``m×n`` weight is ``m`` rows of int8 codes ``q ∈ [−127, 127]`` and one scale per row
(``Ŵ[i, j] = s_i·q[i, j]``), the scale in the weight's compute dtype (fp32 or bf16): 1 byte per
value plus ``2/n`` or ``4/n``. Row-wise absmax scales are torchao's layout, which its forward,
backward and FSDP2 hooks are written for; a row is also what one kernel program reduces. Finer
groups (e.g. 128 values) would bound an outlier's damage to its group, but the scales would no
longer be torchao's (its ``F.linear`` applies one scale per output row) and a 128-group would
cost ``2/128`` bytes per value more; rows suffice here because stochastic rounding keeps every
update in expectation whatever the step ``s_i``. The scale is ``absmax/127``, rounded *up* to
bf16 for bf16 scales (rounding to nearest, as torchao does, puts a row's absmax past 127 steps in
most bf16 rows and clips it: a bias) (:mod:`lowrank_optim.kernels.int8_weight_update`).

Why torchao's tensor, and what is built around it
--------------------------------------------------
torchao 0.18's ``Int8QuantizedTrainingLinearWeight`` (``torchao.prototype.quantized_training``),
probed on CPU with torch 2.13:

* **forward/backward work** for fp32 weights with fp32 inputs and bf16 weights with bf16 or
  fp32 inputs (an fp32 weight with bf16 input fails, as for ``nn.Linear``). ``F.linear`` computes
  ``(x @ q.T.to(x.dtype)) * s``: a temporary of one layer's codes in the input dtype, nothing
  resident; backward saves the input and the int8 tensor, not a dequantized copy.
* **the gradient** is a plain tensor of the weight's apparent dtype (= the scales' dtype), of
  shape ``m×n``: ``∂L/∂Ŵ``; optimizers' ``zeros_like`` state comes out plain too.
* **storage**: ``int_data`` (int8, ``m×n``) and ``scale`` (1-D, the source dtype), plain tensors
  that can be written in place: the library does its own rounding into them.
* **its rounding** (``copy_``/``add_``/``addcdiv_``) draws from the *global* RNG
  (``torch.rand_like``): not per-parameter seedable, so not the bitwise-equal-replica noise this
  library needs; and its scales are rounded to nearest (biased at the row max, above). AdamW fails
  on it (``aten.mul_`` is not implemented); ``F.embedding`` is not implemented either.
* **state dicts** hold the subclass itself: ``torch.load(weights_only=True)`` refuses it.
* **DDP**: ``DistributedDataParallel(model)`` fails at its initial parameter broadcast (torchao's
  ``cat`` takes int8 weights only, the bucket mixes them with biases and norms); with
  ``init_sync=False`` (the replicas are equal anyway: every rank converts the same weights)
  forward, backward and the gradient all-reduce work (the gradients are plain).

So torchao's tensor serves as the parameter (forward, backward, gradient, device moves; its FSDP2
all-gather hooks are not exercised here), and the library adds what it cannot do: the scale rule,
the seeded counter-based stochastic rounding and the fused update (:mod:`.update`, a PyTorch path
and a Triton kernel that write the same bits, checked against
:mod:`lowrank_optim.reference.int8_weights` in float64), ``F.embedding`` (:mod:`.embedding`),
plain-tensor checkpoints (:mod:`.checkpoint`) and the model conversion (:mod:`.convert`). torchao
is needed only here (``pip install 'lowrank-optim[int8]'``), imported on first use. Writing a
tensor subclass of our own would duplicate torchao's FSDP2 and device handling for no gain in
what the update needs, which is direct access to codes and scales.
Every optimizer of the library steps int8 weights through its parameters' plans (stage 2:
:mod:`lowrank_optim.weight_store`). Not covered: FSDP2-sharded int8 weights (a DTensor's local rows
would need the global row offset for the noise; the optimizers refuse them by name).
"""
from .codec import dequantize_weight, noise_seed, quantize_weight
from .convert import dequantize_model_weights, quantize_model_weights
from .tensor import int8_storage, int8_weight, is_int8_weight
from .update import int8_update_

__all__ = [
    "dequantize_model_weights", "dequantize_weight", "int8_storage", "int8_update_", "int8_weight",
    "is_int8_weight", "noise_seed", "quantize_model_weights", "quantize_weight",
]
