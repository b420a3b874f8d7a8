"""Integrations with other libraries. This package imports none of them; each submodule imports its own.

- :mod:`.transformers`: the Hugging Face ``Trainer``: optimizer factories for
  ``optimizer_cls_and_kwargs`` (:mod:`.trainer_factories`), a callback that logs every group's
  learning rate and the subspace statistics (:mod:`.trainer_callback`), and saving / loading SST
  and SLTrain models with ``save_pretrained`` (:mod:`.pretrained`).
- :mod:`.torchtitan`: torchtitan's ``OptimizersContainer`` with the library's optimizers by name,
  activated by ``--override.imports lowrank_optim.integrations.torchtitan.lowrank_optimizers``
  (:mod:`.torchtitan_api` checks that the installed torchtitan fits).
"""
