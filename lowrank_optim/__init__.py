from .registry import available_optimizers, create_optimizer, register_optimizer  # noqa: F401
