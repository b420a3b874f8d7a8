"""Command-line flags, generated from :class:`experiments.config.TrainConfig`.

Every flag field becomes ``--<name>`` (plus aliases such as ``--galore_scale``). With
``--continue_from`` the checkpoint's saved config is the base and only the flags given explicitly
override it, so ``--continue_from runs/x/model_200`` alone resumes the same run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from experiments.config import TrainConfig, flag_fields

_ARGPARSE_KEYS = ("type", "choices", "nargs", "const")


def _shown_by_argparse(parse):
    """``parse`` (a flag's ``type``) with its ``ValueError`` message kept: argparse prints only
    "invalid <function name> value" for a ``ValueError``, the message of an ``ArgumentTypeError``."""
    if parse in (int, float):  # argparse's "invalid int value: 'x'" says it all
        return parse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The parser of every flag; with ``suppress_defaults`` absent flags are left out of the result."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.pretrain",
        description="Pretrain a LLaMA with a lowrank_optim optimizer (GaLore-style flags).",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    defaults = TrainConfig()
    for field in flag_fields():
        options = {key: field.metadata[key] for key in _ARGPARSE_KEYS if key in field.metadata}
        if "type" in options:
            options["type"] = _shown_by_argparse(options["type"])
        default = getattr(defaults, field.name)
        if not suppress_defaults:
            options["default"] = default
        parser.add_argument(
            f"--{field.name}",
            *field.metadata.get("aliases", ()),
            dest=field.name,
            help=f"{field.metadata['help']} (default: {'none' if default is None else json.dumps(default)})",
            **options,
        )
    return parser


def explicit_flags(argv: Sequence[str] | None) -> dict:
    """Only the flags present in ``argv``, parsed."""
    return vars(build_parser(suppress_defaults=True).parse_args(argv))


def checkpoint_config_path(continue_from: str) -> Path:
    """``config.json`` of the checkpoint that ``continue_from`` names (a folder or a save_dir)."""
    from experiments.checkpoint import resolve_checkpoint

    return resolve_checkpoint(Path(continue_from)) / "config.json"


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The (unresolved) config of a command line; see the module docstring for ``--continue_from``."""
    explicit = explicit_flags(argv)
    if explicit.get("continue_from"):
        base = TrainConfig.load_json(checkpoint_config_path(explicit["continue_from"])).to_dict()
        return TrainConfig.from_dict({**base, **explicit})
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def config_to_argv(config: TrainConfig) -> list[str]:
    """Flags that :func:`parse_config` turns back into ``config`` (``None`` values are left out)."""
    argv: list[str] = []
    for field in flag_fields():
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, dict):
            argv += [f"--{field.name}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{field.name}", *map(str, value)]
        else:
            argv += [f"--{field.name}", str(value)]
    return argv
