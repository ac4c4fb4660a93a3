"""Command-line options: the ones every command shares, and the ones generated from config dataclasses.

A config dataclass (`config.py`) describes each field once: its type, its default, and in the field's
metadata its help text (plus, where the name alone would clash, its `flag`). `add_config_options`
turns every field into an argparse option (nested dataclasses such as `TrainConfig.optim` are
flattened: `--matrix-lr`, not `--optim.matrix-lr`), and `config_from_args` builds the dataclass back
from the parsed options, so its `__post_init__` validation is the one the API gets too. A
`ConfigError` raised there names the field; `cli.main` prints it as the option (`--seq-len must be
...`) and exits with status 2.

The bottom of the CLI: command modules in every room import it, so it imports only `config`.
`picochat/cli.py` (the entry point, at the top) collects the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import ConfigError


def add_run_arg(parser: argparse.ArgumentParser) -> None:
    """`--run NAME`: which run directory a stage reads and writes; and `--debug`."""
    # --run-name is the spelling to use under torchrun, whose own parser rejects "--run" as an
    # ambiguous abbreviation of its --run-path option
    parser.add_argument("--run", "--run-name", dest="run", default="default",
                        help="run name under $PICOCHAT_HOME/runs (default: default); under torchrun write --run-name")
    add_debug_arg(parser)


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


# ---------------------------------------------------------------------------------------------------
# options generated from dataclasses


@dataclass(frozen=True)
class Option:
    """One command-line option standing for one (possibly nested) dataclass field."""

    path: tuple[str, ...]  # field names from the outer dataclass down, e.g. ("optim", "matrix_lr")
    flag: str  # "--matrix-lr"
    dest: str  # attribute on the parsed namespace
    kind: str  # bool | optional_bool | list | tuple | value
    parse: Callable[[str], Any]  # one string -> one value (list and tuple items too)
    default: Any
    help: str
    choices: tuple | None
    metavar: str | None
    nargs: int | None  # tuple fields: their length


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _int_or_word(text: str) -> int | str:
    """`int | str` fields (e.g. --device-batch-size 32 or auto): a number if it is one."""
    try:
        return int(text)
    except ValueError:
        return text


def _parser_for(tp: Any) -> Callable[[str], Any]:
    if tp in (int, float, str):
        return tp
    if set(typing.get_args(tp)) == {int, str}:
        return _int_or_word
    raise TypeError(f"no command-line form for type {tp!r}")


def _describe(tp: Any, meta: dict, name: str) -> tuple[str, Callable[[str], Any], int | None]:
    """(kind, item parser, tuple length) of a field type."""
    inner, optional = _unwrap_optional(tp)
    if inner is bool:
        return ("optional_bool" if optional else "bool"), bool, None
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is list:
        return "list", _parser_for(args[0]), None
    if origin is tuple and args and Ellipsis not in args:
        return "tuple", _parser_for(args[0]), len(args)
    return "value", _parser_for(inner), None


def config_options(cls: type, defaults: Any = None, prefix: tuple[str, ...] = ()) -> list[Option]:
    """Every field of dataclass `cls` (nested dataclasses flattened) as an Option, defaults taken
    from the instance `defaults` (the class's own when None). Fields with metadata cli=False are left out."""
    defaults = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if not meta.get("cli", True):
            continue
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_options(hints[f.name], value, prefix + (f.name,))
            continue
        kind, parse, n = _describe(hints[f.name], meta, f.name)
        flag = meta.get("flag", f.name.replace("_", "-"))
        out.append(Option(prefix + (f.name,), f"--{flag}", flag.replace("-", "_"), kind, parse, value,
                          meta.get("help", ""), tuple(meta["choices"]) if "choices" in meta else None,
                          meta.get("metavar"), n))
    flags = [o.flag for o in out]
    clash = {x for x in flags if flags.count(x) > 1}
    if clash:
        raise TypeError(f"{cls.__name__}: several fields want the options {sorted(clash)}; give one a 'flag'")
    return out


def _help_text(o: Option, default: Any) -> str:
    shown = default
    if o.kind == "tuple" and default is not None:
        shown = " ".join(str(x) for x in default)
    if o.kind in ("bool", "optional_bool") and default is None:
        return o.help
    if default is None or default == []:
        return o.help
    return f"{o.help} (default: {shown})" if o.help else f"(default: {shown})"


def add_options(parser: argparse.ArgumentParser | Any, options: list[Option], defaults: dict | None = None) -> None:
    """Add `options` to a parser or argument group; `defaults` (dest -> value) replaces shown defaults."""
    for o in options:
        default = (defaults or {}).get(o.dest, o.default)
        kw: dict[str, Any] = {"dest": o.dest, "default": default, "help": _help_text(o, default)}
        if o.kind in ("bool", "optional_bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = o.parse
            if o.choices is not None:
                kw["choices"] = o.choices
            if o.metavar:
                kw["metavar"] = o.metavar
            if o.kind == "list":
                kw["nargs"] = "+"
            elif o.kind == "tuple":
                kw["nargs"] = o.nargs
        parser.add_argument(o.flag, **kw)


def add_config_options(parser: argparse.ArgumentParser, cls: type, defaults: Any = None, *,
                       skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None, title: str | None = None,
                       shown: dict | None = None) -> list[Option]:
    """One option per field of `cls` (all, or those in `only`, less those in `skip`), in an argument
    group titled `title`; `shown` replaces argparse defaults by dest."""
    options = [o for o in config_options(cls, defaults) if o.path[-1] not in skip and o.path[0] not in skip
               and (only is None or o.path[-1] in only)]
    add_options(parser.add_argument_group(title) if title else parser, options, shown)
    return options


def _build(cls: type, values: dict[tuple[str, ...], Any], base: Any, prefix: tuple[str, ...] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, getattr(base, f.name), path)
        elif path in values:
            v = values[path]
            kwargs[f.name] = tuple(v) if isinstance(v, list) and typing.get_origin(
                _unwrap_optional(hints[f.name])[0]) is tuple else v
        else:
            kwargs[f.name] = getattr(base, f.name)
    return cls(**kwargs)


def config_from_args(args: argparse.Namespace, cls: type, defaults: Any = None, *,
                     skip: tuple[str, ...] = (), **fixed: Any) -> Any:
    """The dataclass back from parsed options (fields in `fixed` are given directly). Validation is
    the dataclass's own; its ConfigError names the field and, through Option.flag, the option."""
    base = defaults if defaults is not None else cls()
    values = {o.path: getattr(args, o.dest) for o in config_options(cls, base)
              if o.path[-1] not in skip and o.path[0] not in skip and hasattr(args, o.dest)}
    values.update({(k,): v for k, v in fixed.items()})
    return _build(cls, values, base)


def apply_settings(cfg: Any, settings: list[str], flag_prefix: str = "", extra: tuple[str, ...] = ()
                   ) -> tuple[Any, dict[str, str]]:
    """`cfg` with KEY=VALUE settings applied: KEY is any option of its class (dashes or underscores,
    no leading dashes), VALUE as on the command line (lists and tuples comma-separated). Keys named in
    `extra` come back as raw strings for the caller. Errors name the option as `{flag_prefix}KEY`."""
    options = {o.flag[2:]: o for o in config_options(type(cfg), cfg)}
    values: dict[tuple[str, ...], Any] = {}
    rest: dict[str, str] = {}
    flags: dict[str, str] = {}
    for item in settings:
        key, eq, text = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not eq:
            raise ConfigError(key, "given as KEY=VALUE", item, flag=f"{flag_prefix}{key}")
        if key in extra:
            rest[key] = text
            continue
        if key not in options:
            raise ConfigError(key, "one of: " + ", ".join(sorted(options) + list(extra)), item,
                              flag=f"{flag_prefix}{key}")
        o = options[key]
        values[o.path] = _parse_setting(o, text, f"{flag_prefix}{key}")
        flags[o.path[-1]] = f"{flag_prefix}{key}"
    try:
        return _build(type(cfg), values, cfg), rest
    except ConfigError as e:  # name the setting as it was written
        raise ConfigError(e.field, e.rule, e.value, flag=flags.get(e.field, f"{flag_prefix}{e.flag[2:]}")) from None


def _parse_setting(o: Option, text: str, flag: str) -> Any:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    try:
        if o.kind in ("bool", "optional_bool"):
            return words[text.strip().lower()]
        if o.kind in ("list", "tuple"):
            return [o.parse(x) for x in text.split(",")]
        return o.parse(text)
    except (KeyError, ValueError):
        kind = {"bool": "true or false", "optional_bool": "true or false"}.get(o.kind, f"a valid {o.path[-1]}")
        raise ConfigError(o.path[-1], kind, text, flag=flag) from None


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse `type` for hand-written options (the benchmarks'): an integer >= `lo`, else
    argparse's own one-line error (exit 2) naming the option and the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo} (got {value})")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def float_in(lo: float, hi: float = float("inf"), *, lo_open: bool = False) -> Callable[[str], float]:
    """Like `int_at_least` for a float in [lo, hi] (or (lo, hi] with `lo_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (lo < value if lo_open else lo <= value) or not value <= hi or value != value:
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"must be in {left}{lo}, {hi}] (got {text})")
        return value

    parse.__name__ = "number"
    return parse
