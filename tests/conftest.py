"""Without a GPU the Triton kernels run on CPU under the interpreter, which must be switched on
before Triton is first imported (anything importing ``torch._dynamo`` imports it): set it here,
before any test module is collected. ``tests/kernels/test_kernels_compile.py`` compiles the real kernels
for GPU targets in subprocesses without it."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
