"""Which ``nn.Linear`` modules a ``target_modules`` value selects, and swapping a submodule in place.

One rule for every place the library takes ``target_modules``: :func:`~lowrank_optim.lowrank_param_groups`,
:func:`~lowrank_optim.sst.convert_to_sst` and :func:`~lowrank_optim.sltrain.convert_to_sltrain`.

``target_modules`` is one of

* a collection of strings (tuple, list, set, ...): a module is selected when its qualified name
  *contains* one of them (``("attn", "mlp")`` selects ``model.layers.0.self_attn.q_proj`` and
  ``model.layers.0.mlp.up_proj``);
* a single string: a regular expression that must match the *whole* qualified name
  (:func:`re.fullmatch`, PEFT's convention), e.g. ``r".*\\.(q|v)_proj"``;
* the string ``"all-linear"``: every candidate except the output head. The head is the module
  ``model.get_output_embeddings()`` returns when the model has that method (Hugging Face models:
  ``lm_head``; ``None`` there, as for a ``LlamaModel`` without head, excludes nothing); for any other
  model it is the last ``nn.Linear`` (or subclass) of ``model.named_modules()``, in registration order.

Candidates are the ``nn.Linear`` submodules of the model (the root module itself never), each
shared module once. Other modules a rule matches (``self_attn``, ``mlp`` containers, layers already
converted) are passed over. A matched *subclass* of ``nn.Linear`` (such as
``nn.MultiheadAttention``'s ``out_proj``, whose owner reads ``.weight`` directly) is refused with a
``ValueError``, as is a rule that selects nothing; ``"all-linear"`` passes subclasses over instead.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from torch import nn

from .validation import InvalidHyperparameter

ALL_LINEAR = "all-linear"
_NAMES_SHOWN = 6

TargetModules = str | Collection[str]


def select_linear_modules(model: nn.Module, target_modules: TargetModules) -> list[tuple[str, nn.Linear]]:
    """The ``(qualified name, module)`` pairs of ``model`` that ``target_modules`` selects, in
    ``named_modules()`` order (module docstring for the rule).

    Raises ``ValueError`` naming ``target_modules`` for a malformed value (an empty collection, a
    non-string or empty element, an invalid regular expression), for a match that is a subclass of
    ``nn.Linear``, and when nothing is selected (the message lists some of the model's
    ``nn.Linear`` names).
    """
    linears = [(name, module) for name, module in model.named_modules() if name and isinstance(module, nn.Linear)]
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        head = output_head(model)
        selected = [(name, m) for name, m in linears if type(m) is nn.Linear and m is not head]
    else:
        is_selected = _name_rule(target_modules)
        selected = [(name, m) for name, m in linears if is_selected(name)]
        for name, module in selected:
            if type(module) is not nn.Linear:
                raise InvalidHyperparameter(
                    "target_modules", target_modules,
                    f"Invalid target_modules: {target_modules!r} matches {name!r}, a {type(module).__name__} "
                    "(a subclass of nn.Linear); only plain nn.Linear modules are selected: narrow target_modules"
                )
    if not selected:
        names = [name for name, _ in linears]
        shown = ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
        raise InvalidHyperparameter(
            "target_modules", target_modules,
            f"Invalid target_modules: {target_modules!r} matches no nn.Linear of the model "
            f"({_describe(target_modules)}); its nn.Linear modules: [{shown}] ({len(names)} in all)"
        )
    return selected


def replace_submodule(model: nn.Module, qualified_name: str, new_module: nn.Module) -> None:
    """Set the submodule of ``model`` at ``qualified_name`` (e.g. ``"model.layers.0.mlp.up_proj"``) to
    ``new_module``, in place.

    Raises ``ValueError`` when ``qualified_name`` is empty (the model itself cannot be replaced in
    place: wrap it in a container module), and ``AttributeError`` (from ``get_submodule``) when
    its parent does not exist.
    """
    parent_name, _, child_name = qualified_name.rpartition(".")
    if not child_name:
        raise ValueError(
            f"Invalid qualified_name: {qualified_name!r} (the model itself cannot be replaced in place; "
            "wrap it in a container module)"
        )
    setattr(model.get_submodule(parent_name), child_name, new_module)


def _name_rule(target_modules: TargetModules):
    """``target_modules`` (not ``"all-linear"``) checked and turned into a predicate on qualified names."""
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as error:
            raise InvalidHyperparameter(
                "target_modules", target_modules,
                f"Invalid target_modules: {target_modules!r} (a single string is a regular expression: {error})"
            ) from None
        return lambda name: pattern.fullmatch(name) is not None
    if not isinstance(target_modules, Collection):
        raise InvalidHyperparameter(
            "target_modules", target_modules,
            f"Invalid target_modules: {target_modules!r} (expected a collection of name parts, a regular "
            f"expression or {ALL_LINEAR!r})"
        )
    parts = tuple(target_modules)
    if not parts or not all(isinstance(part, str) and part for part in parts):
        raise InvalidHyperparameter("target_modules", target_modules,
                                    f"Invalid target_modules: {target_modules!r} (expected non-empty strings)")
    return lambda name: any(part in name for part in parts)


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head of ``model`` (module docstring): ``model.get_output_embeddings()`` when the
    model has that method, else its last ``nn.Linear`` (or subclass); ``None`` when there is none."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        return get_output_embeddings()
    linears = [module for name, module in model.named_modules() if name and isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def _describe(target_modules: TargetModules) -> str:
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            return "every plain nn.Linear except the output head"
        return "a regular expression, matched against whole qualified names"
    return "a module is selected when its qualified name contains one of them"
