"""Integrations with other libraries. This package imports none of them; each submodule imports its own.

- :mod:`.transformers`: the Hugging Face ``Trainer``: optimizer factories for
  ``optimizer_cls_and_kwargs`` (:mod:`.trainer_factories`), a callback that logs every group's
  learning rate and the subspace statistics (:mod:`.trainer_callback`), and saving / loading SST
  and SLTrain models with ``save_pretrained`` (:mod:`.pretrained`).
"""
