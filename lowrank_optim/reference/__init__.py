"""Slow, paper-faithful implementations used as test oracles for the fast optimizers.

They share no code with the engine: one tensor at a time, explicit loops, the basis from
``scipy.fft``; clarity over speed. Every parameter of a group with an integer ``rank`` that is 2-D
is projected; all others get plain AdamW. ``ReferenceAPOLLOAdamW`` draws its random projections from
seeded CPU generators, never from the global random state. :mod:`.int8_weights` is the float64
reference of the int8 weight format and its stochastically rounded update, :mod:`.philox` the
Python-integer Philox-4x32-10 of its noise.
"""
from .apollo import ReferenceAPOLLOAdamW
from .dct_adamw import ReferenceDCTAdamW
from .galore_adamw import ReferenceGaLoreAdamW

__all__ = ["ReferenceAPOLLOAdamW", "ReferenceDCTAdamW", "ReferenceGaLoreAdamW"]
