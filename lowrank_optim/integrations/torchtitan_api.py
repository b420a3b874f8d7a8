"""What :mod:`.torchtitan` needs of torchtitan, checked before it is used.

torchtitan's optimizer container is not a stable API (0.3.0 replaced the ``[optimizer]`` section of
earlier releases by ``param_groups``). :func:`check_torchtitan_api` looks up every name the
integration uses and raises one ``ImportError`` naming the installed version and what it lacks, so a
release that no longer fits fails at import, not in the middle of a run or, worse, silently.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import PackageNotFoundError, version

TESTED_VERSION = "0.3.0"

# module -> the attributes the integration reads from it
REQUIRED_NAMES: dict[str, tuple[str, ...]] = {
    "torchtitan.components.optimizer": ("OptimizersContainer", "ParamGroupConfig"),
    "torchtitan.components.optimizer.utils": ("init_optim_state",),
    "torchtitan.config": ("derive", "override"),
}
# OptimizersContainer's methods the subclass overrides or calls
CONTAINER_METHODS = ("_resolve_optimizer_factory", "_build_param_groups", "state_dict", "load_state_dict", "step")
# dataclass -> the fields the integration reads or documents
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "OptimizersContainer.Config": ("param_groups", "implementation", "optimizer_factory_kwargs_by_name"),
    "ParamGroupConfig": ("pattern", "optimizer_name", "optimizer_kwargs"),
}


def torchtitan_version() -> str:
    """The installed torchtitan's version (``"unknown"`` for a source tree that was never installed)."""
    try:
        return version("torchtitan")
    except PackageNotFoundError:
        return "unknown"


def missing_torchtitan_api() -> list[str]:
    """The names of :data:`REQUIRED_NAMES`, :data:`CONTAINER_METHODS` and :data:`REQUIRED_FIELDS`
    the installed torchtitan does not have (empty: it fits)."""
    missing, found = [], {}
    for module_name, names in REQUIRED_NAMES.items():
        module = _import(module_name)
        if module is None:
            missing.append(module_name)
            continue
        for name in names:
            if hasattr(module, name):
                found[name] = getattr(module, name)
            else:
                missing.append(f"{module_name}.{name}")
    container, group = found.get("OptimizersContainer"), found.get("ParamGroupConfig")
    if container is not None:
        missing += [f"OptimizersContainer.{name}" for name in CONTAINER_METHODS if not hasattr(container, name)]
    classes = {"OptimizersContainer.Config": getattr(container, "Config", None), "ParamGroupConfig": group}
    for label, names in REQUIRED_FIELDS.items():
        cls = classes[label]
        if cls is None:
            continue
        fields = {field.name for field in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        missing += [f"{label}.{name}" for name in names if name not in fields]
    return missing


def _import(module_name: str):
    """The module, or None if torchtitan has no such module. An ImportError raised while importing
    it (a dependency missing: torchtitan is often installed without them) is re-raised naming both."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (error.name == module_name or module_name.startswith(error.name + ".")):
            return None
        cause = error
    except ImportError as error:
        cause = error
    raise ImportError(
        f"Invalid torchtitan installation: {module_name} (torchtitan {torchtitan_version()}) does not import: "
        f"{cause} (its optimizer container needs tyro and spmd_types beside torch)"
    ) from cause


def check_torchtitan_api() -> None:
    """``ImportError`` naming the installed torchtitan and what it lacks, unless it has everything
    :mod:`lowrank_optim.integrations.torchtitan` uses."""
    missing = missing_torchtitan_api()
    if missing:
        raise ImportError(
            f"Invalid torchtitan version: {torchtitan_version()!r} lacks {', '.join(missing)} "
            f"(lowrank_optim.integrations.torchtitan is written for torchtitan {TESTED_VERSION}'s optimizer "
            f"container; install torchtitan=={TESTED_VERSION})"
        )
