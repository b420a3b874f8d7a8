"""Helpers shared by the test folders: toy models and training loops (``toy``), the registry of
optimizer builds (``optim_db``), reference implementations (``oracles``), the multi-process harness
(``distributed_harness``), SST fixtures (``sst_helpers``) and CLI checks (``cli``). Imported as
``support.<module>``: ``tests/`` is on ``sys.path`` (``pythonpath`` in ``pyproject.toml``)."""
