"""Config files for every role: ``swarm COMMAND --config FILE`` (YAML ``.yaml``/``.yml`` or TOML ``.toml``).

The file's keys mirror the command's long flags, with ``-`` or ``_`` (``initial_peers`` or ``initial-peers`` for
``--initial-peers``); values are typed as the flag expects (a list for a flag that takes several values, ``true`` /
``false`` for a switch such as ``--no-sentinel``). A table named after a command (``dht``, ``serve``, ``train``,
...) holds keys for that command only, so one file can serve several roles; tables of other commands are ignored.
Flags given on the command line win over the file. Problems raise :class:`ConfigFileError` naming the key and file.

    run_id: demo
    serve:
      initial_peers: [/ip4/10.0.0.1/tcp/31337/p2p/Qm...]
      compression: float16
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

FLAG = "--config"
SUFFIXES = (".yaml", ".yml", ".toml")


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message names the file and, where it applies, the key."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        FLAG,
        default=None,
        metavar="FILE",
        help="YAML (.yaml/.yml) or TOML (.toml) file whose keys mirror these flags "
        "(initial_peers or initial-peers); flags given here win over it",
    )


def find_config(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--config`` in ``argv`` (the last one wins, as argparse does), or None."""
    path = None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == FLAG:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                raise ConfigFileError(f"{FLAG} needs a FILE")
            path = args[i + 1]
        elif arg.startswith(FLAG + "="):
            path = arg[len(FLAG) + 1 :]
    return path


def read_config(path: str) -> Dict[str, Any]:
    """Parse a YAML or TOML file into a mapping (by its suffix)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ConfigFileError(
            f"config file {path}: unknown format {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(SUFFIXES)}"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigFileError(f"config file {path} is not UTF-8 text") from None
    if suffix == ".toml":
        toml = _toml_module()
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as e:
            raise ConfigFileError(f"config file {path} is not valid TOML: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigFileError(f"config file {path} is not valid YAML: {_one_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"config file {path} must hold a mapping of flag names to values, not a {type(data).__name__}"
        )
    return data


def _toml_module():
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigFileError("TOML config files need Python >= 3.11 (or `pip install tomli`)") from None
    return tomllib


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Config key (long flag without dashes, with ``_``) -> action, for every flag the file may set."""
    out: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        for opt in action.option_strings:
            if opt.startswith("--") and opt != FLAG:
                out[opt[2:].replace("-", "_")] = action
    return out


def _convert_scalar(value: Any, action: argparse.Action, where: str) -> Any:
    kind = action.type
    if isinstance(value, (dict, list)):
        raise ConfigFileError(
            f"{where}: expected a single value, got a {'list' if isinstance(value, list) else 'table'}"
        )
    if isinstance(value, bool):
        raise ConfigFileError(f"{where}: expected {_kind_name(kind)}, got a boolean")
    if value is None:
        raise ConfigFileError(f"{where}: expected {_kind_name(kind)}, got an empty value")
    if kind is int:
        if isinstance(value, int):
            out: Any = value
        elif isinstance(value, str):
            try:
                out = int(value.strip())
            except ValueError:
                raise ConfigFileError(f"{where}: expected an integer, got {value!r}") from None
        else:
            raise ConfigFileError(f"{where}: expected an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):  # YAML reads 2e-3 (no dot) as a string
            try:
                out = float(value.strip())
            except ValueError:
                raise ConfigFileError(f"{where}: expected a number, got {value!r}") from None
        else:
            raise ConfigFileError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigFileError(f"{where}: expected a finite number, got {value!r}")
    elif kind is None or kind is str:
        if isinstance(value, str):
            out = value
        elif isinstance(value, (int, float)):
            out = str(value)
        else:
            raise ConfigFileError(f"{where}: expected a string, got {value!r}")
    else:  # any other converter argparse would call on the command-line string
        try:
            out = kind(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigFileError(f"{where}: invalid value {value!r}: {e}") from None
    if action.choices is not None and out not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ConfigFileError(f"{where}: invalid choice {value!r} (choose from {choices})")
    return out


def _kind_name(kind) -> str:
    return {int: "an integer", float: "a number"}.get(kind, "a string")


def convert(value: Any, action: argparse.Action, where: str) -> Any:
    """A file value as the flag's parsed value would be, or :class:`ConfigFileError`."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
        # the file says whether the switch is on; a store_false switch is on when its dest is False
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._StoreConstAction):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction):  # a repeatable flag: a list of its values
        items = value if isinstance(value, list) else [value]
        return [_convert_scalar(item, action, where) for item in items]
    if not isinstance(action, argparse._StoreAction):
        raise ConfigFileError(f"{where}: this flag cannot be set from a config file")
    nargs = action.nargs
    if nargs in ("+", "*") or isinstance(nargs, int):
        items = value if isinstance(value, list) else [value]
        if nargs == "+" and not items:
            raise ConfigFileError(f"{where}: expected at least one value")
        if isinstance(nargs, int) and len(items) != nargs:
            raise ConfigFileError(f"{where}: expected {nargs} values, got {len(items)}")
        return [_convert_scalar(item, action, where) for item in items]
    if nargs == "?" and (value is None or value is True):  # the flag given without its optional value
        return action.const
    return _convert_scalar(value, action, where)


def defaults_from_file(
    parser: argparse.ArgumentParser, path: str, command: str, commands: Iterable[str] = ()
) -> Dict[str, Any]:
    """Read ``path`` and check it against ``parser`` (the chosen command's): ``{dest: value}``.

    Top-level keys apply to ``command``; a table named after ``command`` too (its keys win); tables named
    after the other ``commands`` are ignored.
    """
    data = read_config(path)
    commands = set(commands)
    merged: List[tuple] = []
    section = None
    for key, value in data.items():
        if key in commands:
            if not isinstance(value, dict):
                raise ConfigFileError(
                    f"config file {path}: [{key}] must be a table of flags for `swarm {key}`"
                )
            if key == command:
                section = value
            continue
        merged.append((str(key), value, str(key)))
    if section is not None:
        merged += [(str(key), value, f"{command}.{key}") for key, value in section.items()]
    options = _options(parser)
    out: Dict[str, Any] = {}
    for key, value, shown in merged:
        action = (
            options.get(key.replace("-", "_")) if isinstance(key, str) and not key.startswith("-") else None
        )
        if action is None:
            raise ConfigFileError(
                f"config file {path}: unknown key {shown!r}: `swarm {command}` has no flag "
                f"--{key.lstrip('-').replace('_', '-')} (see `swarm {command} --help`)"
            )
        out[action.dest] = convert(value, action, f"config file {path}: key {shown!r}")
    return out


def apply_config_file(root: argparse.ArgumentParser, argv: Sequence[str]) -> Optional[str]:
    """If ``argv`` names a command and ``--config FILE``, make the file's values that command's defaults.

    Flags on the command line still win (they are parsed after); required flags the file sets stop being
    required. Returns the file's path (None if no file was given). Raises :class:`ConfigFileError`.
    """
    subparsers = _subparsers(root)
    if subparsers is None:
        return None
    choices: Mapping[str, argparse.ArgumentParser] = subparsers.choices
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in choices:
        return None
    rest = list(argv)[list(argv).index(command) + 1 :]
    path = find_config(rest)
    if path is None:
        return None
    parser = choices[command]
    defaults = defaults_from_file(parser, path, command, choices.keys())
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False
    parser.set_defaults(**defaults)
    return path


ENV_PREFIX = "SWARM_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(key: str) -> str:
    """The environment variable of a flag's config key: ``initial_peers`` -> ``SWARM_INITIAL_PEERS``."""
    return ENV_PREFIX + key.upper()


def defaults_from_env(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> Dict[str, Any]:
    """``{dest: value}`` from the ``SWARM_*`` variables that name one of ``parser``'s flags (others are ignored:
    a container may carry variables of its own). Values are text: a switch takes 1/true/yes/on or 0/false/no/off,
    a flag of several values takes them separated by spaces or commas. Raises :class:`ConfigFileError`."""
    out: Dict[str, Any] = {}
    for key, action in _options(parser).items():
        name = env_name(key)
        if name not in environ:
            continue
        text = environ[name].strip()
        where = f"environment variable {name}"
        if isinstance(
            action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)
        ):
            if text.lower() not in TRUE + FALSE:
                raise ConfigFileError(f"{where}: expected 1/true/yes/on or 0/false/no/off, got {text!r}")
            value: Any = text.lower() in TRUE
        elif (
            isinstance(action, argparse._AppendAction)
            or action.nargs in ("+", "*")
            or isinstance(action.nargs, int)
        ):
            value = [item for item in text.replace(",", " ").split() if item]
        elif action.nargs == "?" and text == "":
            value = True
        else:
            value = text
        out[action.dest] = convert(value, action, where)
    return out


def apply_environment(root: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]) -> None:
    """Make the chosen command's ``SWARM_*`` variables its defaults, over any config file's (flags still win)."""
    subparsers = _subparsers(root)
    command = next((a for a in argv if not a.startswith("-")), None)
    if subparsers is None or command not in subparsers.choices:
        return
    parser = subparsers.choices[command]
    defaults = defaults_from_env(parser, environ)
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False
    parser.set_defaults(**defaults)


def _subparsers(parser: argparse.ArgumentParser) -> Optional[argparse._SubParsersAction]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def add_config_flag_everywhere(root: argparse.ArgumentParser) -> None:
    """Give every subcommand (also ones added later, as long as this runs last) a ``--config`` flag."""
    subparsers = _subparsers(root)
    if subparsers is None:
        return
    seen = set()
    for parser in subparsers.choices.values():
        if id(parser) in seen:  # aliases share a parser
            continue
        seen.add(id(parser))
        if not any(FLAG in a.option_strings for a in parser._actions):
            add_config_flag(parser)
