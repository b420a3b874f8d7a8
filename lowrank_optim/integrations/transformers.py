"""Hugging Face transformers: everything a ``Trainer`` run needs, in one import.

::

    from lowrank_optim.integrations.transformers import add_lowrank_optim_callback, trainer_optimizer

    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      optimizer_cls_and_kwargs=trainer_optimizer("dct_adamw", lr=1e-3))
    add_lowrank_optim_callback(trainer)          # every group's lr and the refresh statistics in the logs

- :mod:`.trainer_factories`: ``trainer_optimizer``, ``TRAINER_FACTORIES`` and the factories;
- :mod:`.trainer_callback`: ``LowRankOptimCallback``, ``add_lowrank_optim_callback``;
- :mod:`.pretrained`: ``save_pretrained_merged``, ``from_pretrained_converted``, ``merged_state_dict``
  for SST and SLTrain models.

Importing this module imports ``transformers``; ``lowrank_optim`` itself never does.
"""

from .pretrained import from_pretrained_converted, merged_state_dict, save_pretrained_merged
from .trainer_callback import (
    ClipInOptimizerCallback,
    LowRankOptimCallback,
    add_lowrank_optim_callback,
    unwrap_optimizer,
)
from .trainer_factories import (
    TRAINER_FACTORIES,
    AdamWFactory,
    APOLLOAdamWFactory,
    APOLLOMiniFactory,
    DCTProjAdamFactory,
    GaLoreAdamW8bitFactory,
    GaLoreAdamWFactory,
    SSTAdamWFactory,
    TrainerOptimizerFactory,
    trainable_named_parameters,
    trainer_optimizer,
)

__all__ = [
    "TRAINER_FACTORIES",
    "ClipInOptimizerCallback",
    "AdamWFactory",
    "APOLLOAdamWFactory",
    "APOLLOMiniFactory",
    "DCTProjAdamFactory",
    "GaLoreAdamW8bitFactory",
    "GaLoreAdamWFactory",
    "LowRankOptimCallback",
    "SSTAdamWFactory",
    "TrainerOptimizerFactory",
    "add_lowrank_optim_callback",
    "from_pretrained_converted",
    "merged_state_dict",
    "save_pretrained_merged",
    "trainable_named_parameters",
    "trainer_optimizer",
    "unwrap_optimizer",
]
