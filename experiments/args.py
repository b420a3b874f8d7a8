"""Command-line flags, generated from :class:`experiments.config.TrainConfig`.

Every flag field becomes ``--<name>`` (plus aliases such as ``--galore_scale``). With
``--continue_from`` the checkpoint's saved config is the base and only the flags given explicitly
override it, so ``--continue_from runs/x/model_200`` alone resumes the same run in the checkpoint's
folder ``runs/x``; with ``--run_name`` (or ``--save_dir``) the resumed run is a new one in a folder of
its own (``experiments/run_folder.py`` refuses any folder that holds another run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from experiments.config import TrainConfig, flag_fields, parse_bool

_ARGPARSE_KEYS = ("type", "choices", "nargs", "const")
# ``--help`` sections: the first flag of each (the flags that follow it, in experiments/config.py's
# order, belong to it).
GROUP_STARTS = {
    "model_config": "model",
    "dataset": "data",
    "num_training_steps": "schedule",
    "optimizer": "optimizer",
    "rank": "low-rank projection (projected optimizers)",
    "parameterization": "parameterization (SST, SLTrain)",
    "seed": "run",
    "eval_every": "evaluation and checkpoints",
    "log_every": "logging",
}
USAGE = "python -m experiments.pretrain [--flag value ...]"
EPILOG = (
    "Switches also take a value (--fsdp true|false). A flag's full story: experiments/config.py and "
    "experiments/README.md."
)


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


class Switch(argparse.Action):
    """A boolean flag: ``--x`` (true), ``--no-x`` (false), or ``--x true|false`` (what
    :func:`config_to_argv` writes and wandb's ``--x=True`` passes)."""

    def __init__(self, option_strings, dest, **kwargs):
        negatives = [f"--no-{name[2:]}" for name in option_strings if name.startswith("--")]
        kwargs.pop("type", None)
        super().__init__([*option_strings, *negatives], dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value, got {values!r}")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if values is None else parse_bool(values))
        except ValueError as error:
            parser.error(f"argument {option_string}: {error}")


class _Formatter(argparse.HelpFormatter):
    """Switches as ``--x, --no-x``, other flags as ``--x VALUE`` once (not once per alias)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(shutil.get_terminal_size().columns, 110))

    def _format_action_invocation(self, action):
        if isinstance(action, Switch) or not action.option_strings:
            return ", ".join(action.option_strings) or super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(action.option_strings) + f" {metavar}"

    def _get_default_metavar_for_optional(self, action):
        return "N" if action.type is int else "X" if action.type is float else "VALUE"


def _help_text(field: dataclasses.Field, default) -> str:
    """The field's help with its default said once (nothing for switches that default to off)."""
    text = field.metadata["help"]
    if field.name == "optimizer":
        from experiments.methods import available_methods

        text += f"; one of {', '.join(available_methods())}"
    if field.metadata.get("switch") and default is False:
        return text
    shown = field.metadata.get("default_text")
    if shown is None and default is not None and default != [] and default != {}:
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
    return text if shown is None else f"{text} (default {shown})"


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The parser of every flag; with ``suppress_defaults`` absent flags are left out of the result."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.pretrain",
        usage=USAGE,
        description="Pretrain a LLaMA with a lowrank_optim optimizer (GaLore-style flags).",
        epilog=EPILOG,
        formatter_class=_Formatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    defaults = TrainConfig()
    group = parser
    for field in flag_fields():
        if field.name in GROUP_STARTS:
            group = parser.add_argument_group(GROUP_STARTS[field.name])
        options = {key: field.metadata[key] for key in _ARGPARSE_KEYS if key in field.metadata}
        if field.metadata.get("switch"):
            options = {"action": Switch}
        elif "type" in options:
            options["type"] = _shown_by_argparse(options["type"])
        if "choices" in options:
            options["metavar"] = "{" + ",".join(map(str, options["choices"])) + "}"
        default = getattr(defaults, field.name)
        if not suppress_defaults:
            options["default"] = default
        group.add_argument(
            f"--{field.name}",
            *field.metadata.get("aliases", ()),
            dest=field.name,
            help=_help_text(field, default).replace("%", "%%"),
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
        config_path = checkpoint_config_path(explicit["continue_from"])
        base = TrainConfig.load_json(config_path).to_dict()
        # The run continues in the folder its checkpoint is in (wherever the run was moved to); a new
        # --run_name without --save_dir is a new run in runs/<run_name>.
        base["save_dir"] = None if "run_name" in explicit else str(config_path.parent.parent)
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
