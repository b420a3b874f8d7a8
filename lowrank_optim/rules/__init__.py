"""Update rules of projected weights by name (:mod:`.base`). A new rule: one file with an
:class:`UpdateRule` subclass, plus one line here; a param group picks it with ``update_rule``."""
from .adam_atan2 import AdamAtan2Rule
from .adamw import AdamWRule
from .apollo import APOLLORule
from .base import AdamHyperparameters, ProjectedStep, UpdateRule

RULES: dict[str, UpdateRule] = {
    AdamWRule.name: AdamWRule(),
    AdamAtan2Rule.name: AdamAtan2Rule(),
    APOLLORule.name: APOLLORule(),
}

__all__ = ["RULES", "AdamHyperparameters", "AdamWRule", "ProjectedStep", "UpdateRule"]
