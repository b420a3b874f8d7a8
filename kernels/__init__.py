"""Compute kernels of the projected optimizers, installed as ``lowrank_optim.kernels``.

Every operation has a pure-PyTorch reference here; accelerated versions sit beside their reference.
"""
