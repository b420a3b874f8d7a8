"""Update rules of projected weights by name (:mod:`.base`). A new rule: one file with an
:class:`UpdateRule` subclass, plus one line here; a param group picks it with ``update_rule``."""
from .adamw import AdamWRule
from .base import AdamHyperparameters, ProjectedStep, UpdateRule

RULES: dict[str, UpdateRule] = {
    AdamWRule.name: AdamWRule(),
}

__all__ = ["RULES", "AdamHyperparameters", "AdamWRule", "ProjectedStep", "UpdateRule"]
