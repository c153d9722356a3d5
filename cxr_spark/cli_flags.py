"""Small helpers for the command line's flags: help text that shows the real default from ``conf/pipeline.toml``,
deprecated spellings of renamed flags, and ``--print-config``'s TOML. Pure Python, no Spark.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from typing import Any

#: Where the deprecation messages of a parse wait until logging is set up (:func:`deprecation_warnings`).
_DEPRECATED_DEST = "_deprecated_flags"


@functools.lru_cache(maxsize=1)
def _default_config():
    from cxr_spark.config import load_config

    return load_config()


def conf_default(section: str, key: str) -> str:
    """The help text's note on a flag whose default comes from ``conf/pipeline.toml``, with today's value.

    >>> conf_default("preprocess", "size")
    '(default 224, from conf [preprocess] size)'
    """
    try:
        value = getattr(getattr(_default_config(), section), key)
    except (OSError, ValueError, AttributeError):  # a broken conf file must not break --help
        return f"(default from conf [{section}] {key})"
    shown = json.dumps(value) if isinstance(value, (bool, str)) else value
    return f"(default {shown}, from conf [{section}] {key})".replace("%", "%%")


class _DeprecatedStore(argparse.Action):
    """Stores like the flag it stands for, and notes that the old spelling was used."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        notes = getattr(namespace, _DEPRECATED_DEST, None) or []
        notes.append(f"{option_string} is deprecated: use {self.replacement} (same meaning)")
        setattr(namespace, _DEPRECATED_DEST, notes)


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1 (argparse names the flag in its one-line error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line as one line naming the flag (argparse prints its whole
    usage block first); ``--help`` still shows the usage. Its subcommands' parsers are of this class too.

    >>> OneLineParser(prog="cxr-spark train").error("argument --epochs: invalid int value: 'x'")
    Traceback (most recent call last):
    SystemExit: 2
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a deprecated spelling of ``new``, an option already added to ``parser`` (a flag that
    takes a value): same destination, type, choices and metavar; hidden from the help, which says ``new``
    replaced it; each use gives one warning (:func:`deprecation_warnings`).

    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--arch", help="model name")
    >>> deprecated_alias(parser, "--model", "--arch")
    >>> args = parser.parse_args(["--model", "small_cnn"])
    >>> args.arch, deprecation_warnings(args)
    ('small_cnn', ['--model is deprecated: use --arch (same meaning)'])
    """
    action = parser._option_string_actions[new]  # argparse has no public lookup of an added option
    if action.nargs == 0:
        raise ValueError(f"{new} takes no value; deprecated_alias handles flags with a value only")
    parser.add_argument(old, dest=action.dest, action=_DeprecatedStore, replacement=new, type=action.type,
                        choices=action.choices, metavar=action.metavar, nargs=action.nargs, help=argparse.SUPPRESS)
    if action.help and action.help is not argparse.SUPPRESS:
        action.help += f" (formerly {old}, still accepted)"


def deprecation_warnings(args: argparse.Namespace) -> list[str]:
    """The deprecation messages of the flags ``args`` was parsed from, taken out of ``args``."""
    notes = vars(args).pop(_DEPRECATED_DEST, None)
    return list(notes or [])


def relax_required(parser: argparse.ArgumentParser) -> None:
    """Make every required option of ``parser`` optional (``--print-config`` needs no paths)."""
    for action in parser._actions:  # argparse has no public way to list them
        if action.option_strings:
            action.required = False


def _plain(section: Any) -> dict:
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)


def settings_toml(sections: dict[str, Any], header: str) -> str:
    """``sections`` (a name to a config dataclass or a dict of scalars) as TOML, one ``[name]`` table each; a
    value that is None (not set) is shown as a comment, as TOML has no null.

    >>> print(settings_toml({"score": {"split": "val", "batch_size": 64, "layer": None}}, "# effective"))
    # effective
    <BLANKLINE>
    [score]
    split = "val"
    batch_size = 64
    # layer: not set
    <BLANKLINE>
    """
    lines = [header]
    for name, section in sections.items():
        lines += ["", f"[{name}]"]
        for key, value in _plain(section).items():
            # JSON's spelling of a string, number or boolean is TOML's
            lines.append(f"# {key}: not set" if value is None else f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
