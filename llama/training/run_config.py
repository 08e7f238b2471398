"""Run configuration files: `train.py --config run.toml`.

Keys are train.py's flags without the dashes in front (`seq-len = 2048`, or `seq_len`);
tables may group them (`[batch]`), their names are ignored. The command line overrides the
file. A run writes its resolved flags to SAVE_DIR/config.toml, which `--config` reads back
to repeat it exactly."""

import argparse
import difflib
import json
import tomllib
from pathlib import Path


def _flag_actions(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def _flatten(table: dict, path: Path) -> dict:
    flat = {}
    for key, value in table.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            if isinstance(item, dict):
                raise ValueError(f"{path}: [{key}.{name}]: tables nest one level at most")
            dest = name.replace("-", "_")
            if dest in flat:
                raise ValueError(f"{path}: {name} is given twice")
            flat[dest] = item
    return flat


def read_config(path, parser: argparse.ArgumentParser) -> dict:
    """The file's values by argparse dest, checked against the parser's flags."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: not valid TOML ({err})") from None
    actions = _flag_actions(parser)
    values = {}
    for dest, value in _flatten(table, path).items():
        action = actions.get(dest)
        if action is None:
            near = difflib.get_close_matches(dest, actions, n=1)
            hint = f"; did you mean {near[0].replace('_', '-')}?" if near else "; see train.py --help for the flags"
            raise ValueError(f"{path}: unknown key {dest.replace('_', '-')!r}{hint}")
        values[dest] = _checked(value, action, path)
    return values


def _checked(value, action: argparse.Action, path: Path):
    name = action.option_strings[-1].lstrip("-")
    takes_bool = action.nargs == 0
    if takes_bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: {name} = {value!r}: write true or false")
        return value
    if action.nargs in ("*", "+"):
        if not isinstance(value, list):
            value = [value]
        return [_one(v, action, path, name) for v in value]
    return _one(value, action, path, name)


def _one(value, action: argparse.Action, path: Path, name: str):
    if isinstance(value, (dict, list, bool)) and action.type is not None and action.type is not bool:
        raise ValueError(f"{path}: {name} = {value!r}: expected one {action.type.__name__}")
    if action.type is int and isinstance(value, float):
        raise ValueError(f"{path}: {name} = {value!r}: expected a whole number")
    if action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {name} = {value!r}: expected a {action.type.__name__}") from None
    elif action.type is None and not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{path}: {name} = {value!r}: choose one of {', '.join(map(str, action.choices))}")
    return value


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, with the values of `--config FILE` as defaults under the command line's."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**read_config(known.config, parser))
        except ValueError as err:
            parser.error(str(err))
    return parser.parse_args(argv)


def write_config(opts: argparse.Namespace, parser: argparse.ArgumentParser, path) -> None:
    """Every flag's resolved value as TOML (flags left unset, None, are left out)."""
    lines = [f"# resolved flags of this run: train.py --config {Path(path).name} repeats it"]
    for dest in _flag_actions(parser):
        value = getattr(opts, dest, None)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, (list, tuple)):
            text = "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
        else:
            text = json.dumps(str(value))
        lines.append(f"{dest.replace('_', '-')} = {text}")
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
