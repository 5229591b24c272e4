"""Strict configs: documented dataclasses filled from defaults, then a YAML file, then CLI flags.

A config is a dataclass whose fields are declared with `option(default, help)`; its `__post_init__`
checks ranges and combinations by raising `ConfigError`. `config_from_dict` builds one strictly: an
unknown key suggests the nearest field name, and every value is checked (and coerced from a string)
against the field's annotation. `add_config_arguments` and `config_from_args` put a config on the
command line: `--config FILE` loads YAML and `--field-name VALUE` flags override it. YAML values and
flag strings go through the same coercion, so `steps: "3"` and `--steps 3` behave alike. A list flag
takes `a,b` or YAML flow `[a, "b, with comma"]`; a nested dataclass field `train` is set with
`--train.lr`, and a mapping flag (`--weights '{clip: 2}'`) merges into the YAML's mapping key by key.
A config class may take defaults from a file its data names (`data_defaults`: a model folder's sampling
defaults, rlhf/model_defaults.py): dataclass defaults < that file < YAML < flags.
Every number is checked when the config is built: a float field takes finite values only and an int
field what torch's int64 holds. Only the standard library and PyYAML are imported, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import math
import os
import pathlib
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

from rlhf.errors import UserError, quote

T = TypeVar("T")
_TRUE, _FALSE, _NONE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"none", "null", "~"}
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", pathlib.Path: "a path"}
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # an int field holds what torch's int64 holds
_METAVARS = {int: "INT", float: "FLOAT", str: "STR", pathlib.Path: "PATH", list: "LIST", tuple: "LIST", dict: "MAP"}


def option(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None,
           check: Callable[[Any], str | None] | None = None, metadata: Mapping[str, Any] | None = None) -> Any:
    """A `dataclasses.field` whose metadata carries `help`, optional `choices` and an extra CLI `flag`.

    `check(value)` returns what is wrong with a well-typed value (completing "field 'x' ..."), or None.
    A list, dict, set or dataclass default is deep-copied for every instance (`default_factory`);
    pass `dataclasses.MISSING` for a required field.
    """
    meta = {**(metadata or {}), "help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        meta["check"] = check
    if flag is not None:
        meta["flag"] = flag
    if isinstance(default, (list, dict, set)) or _is_section(type(default)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A well-typed but invalid value (range, combination); raise it from a config's `__post_init__`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r} {message}")
        self.field, self.message = field, message


def config_from_dict(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Build `cls` from `data`, rejecting unknown keys and ill-typed values; `source` prefixes errors."""
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: expected a mapping of {cls.__name__} fields, got {quote(data)}")
    data, from_file = _with_data_defaults(cls, data)
    return _build(cls, data, lambda key: from_file.get(key.split(".")[0], source))


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config file whose top level is a mapping (an empty file gives `{}`)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or str(err)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{at}: {' '.join(problem.split())}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read config file ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of field names at the top level, got {type(data).__name__}")
    return data


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--config FILE` and one flag per field of `cls` (nested sections as `--section.field`).

    Also turns off argparse's prefix matching on `parser`, so a typo such as `--step` is an error
    rather than a silent abbreviation of `--steps`.
    """
    parser.allow_abbrev = False
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file with any of the fields below; command-line flags override it")
    groups: dict[str, Any] = {"": parser}
    for key, f, tp in _walk(cls):
        section = key.rpartition(".")[0]
        if _is_section(tp):
            groups[key] = parser.add_argument_group(f"{key} ({tp.__name__})", _escape(f.metadata.get("help")))
            continue
        names = [f"--{key.replace('_', '-')}", f"--{key}"]
        if "flag" in f.metadata:
            names.append(f"--{section}.{f.metadata['flag']}" if section else f"--{f.metadata['flag']}")
        kwargs: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": _flag_help(f, tp)}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            plain = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
            kind = (typing.get_origin(plain[0]) or plain[0]) if len(plain) == 1 else None
            kwargs["metavar"] = "CHOICE" if _choices(f, tp) else _METAVARS.get(kind, "VALUE")
        groups[section].add_argument(*dict.fromkeys(names), **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Merge defaults <- `--config` YAML <- flags given on the command line, then build `cls`."""
    path = getattr(args, "config", None)
    data = load_yaml(path) if path else {}
    given = {key: tp for key, _, tp in _walk(cls) if not _is_section(tp) and hasattr(args, key)}
    from_cli: list[str] = []  # dotted keys whose values came from a flag (errors name the command line)
    for key, tp in given.items():
        node, (*parents, name) = data, key.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                break  # the YAML section is not a mapping; building reports that
        else:
            node[name], merged = _override(node.get(name), getattr(args, key), tp)
            from_cli += [key] if merged is None else [f"{key}.{sub}" for sub in merged]

    data, from_file = _with_data_defaults(cls, data)

    def where(key: str) -> str:
        if key.split(".")[0] in from_file:
            return from_file[key.split(".")[0]]
        cli = any(key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + ".") for k in from_cli)
        return "command line" if cli or not path else str(path)

    return _build(cls, data, where)


def _with_data_defaults(cls: type, data: Mapping[str, Any]) -> tuple[dict, dict[str, str]]:
    """`data` completed with the defaults `cls.data_defaults(data)` reads from a file that `data` names (a model
    folder's `sampling_defaults.json`, rlhf/model_defaults.py), for the fields `data` does not set: the file's
    values sit between the dataclass defaults and the YAML / flags. Also returns {field: that file}, for errors."""
    hook = getattr(cls, "data_defaults", None)
    found = hook(data) if hook is not None else None
    if not found:
        return dict(data), {}
    source, values = found
    values = {key: value for key, value in values.items() if key not in data}
    return {**data, **values}, dict.fromkeys(values, source)


def _override(current: Any, flag: Any, tp: Any) -> tuple[Any, list[str] | None]:
    """The value of a field after a flag, and the dotted sub-keys the flag set (None: all of it).

    A mapping flag (`--rollout '{frames: 9}'`) merges into the YAML's mapping key by key, as a section's
    `--train.lr` does; any other flag replaces the value.
    """
    plain = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    if not (isinstance(current, Mapping) and isinstance(flag, str) and flag.strip().startswith("{")
            and any(typing.get_origin(a) is dict for a in plain)):
        return flag, None
    try:
        parsed = yaml.safe_load(flag)
    except yaml.YAMLError:
        return flag, None  # coercion reports it, naming the field
    if not isinstance(parsed, Mapping):
        return flag, None
    return _merge_mappings(current, parsed), _leaf_keys(parsed)


def _leaf_keys(mapping: Mapping, prefix: str = "") -> list[str]:
    """Dotted paths of the non-mapping values of `mapping`."""
    keys = []
    for key, value in mapping.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, Mapping) and value else [prefix + str(key)]
    return keys


def _merge_mappings(base: Mapping, override: Mapping) -> dict:
    """`base` updated key by key from `override`, recursing where both hold a mapping."""
    merged = dict(base)
    for key, value in override.items():
        both = isinstance(base.get(key), Mapping) and isinstance(value, Mapping)
        merged[key] = _merge_mappings(base[key], value) if both else value
    return merged


def config_to_dict(cfg: Any) -> dict:
    """A plain, YAML-serialisable dict of `cfg`: paths as strings, tuples as lists, sections as dicts."""
    if not _is_section(type(cfg)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML atomically: a temporary file in the same folder, then `os.replace`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def help_problems(cls: type) -> list[str]:
    """Dotted names of the fields of `cls` (recursively) whose help text is missing or blank."""
    return [key for key, f, _ in _walk(cls) if not str(f.metadata.get("help") or "").strip()]


# --- internals -----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # unhashable keys: SafeLoader reports them
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _OutOfRange(UserError):
    """A number of the right type that no field can take (NaN, inf, beyond int64)."""


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) for every init field, a section before its own fields."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            yield prefix + f.name, f, hints[f.name]
            if _is_section(hints[f.name]):
                yield from _walk(hints[f.name], f"{prefix}{f.name}.")


def _build(cls: type[T], data: Mapping, where: Callable[[str], str], prefix: str = "") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            key, close = prefix + str(name), difflib.get_close_matches(str(name), fields, n=1)
            hint = f"did you mean {prefix + close[0]!r}?" if close else "valid fields: " + ", ".join(fields)
            raise UserError(f"{where(key)}: unknown field {key!r} for {cls.__name__}; {hint}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where(key)}: field {key!r} is required ({_describe(hints[name])})")
            continue
        value = kwargs[name] = _coerce(data[name], hints[name], key, where)
        check = f.metadata.get("check")
        if check is not None and value is not None and (problem := check(value)):
            raise UserError(f"{where(key)}: field {key!r} {problem}")
        choices = f.metadata.get("choices")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if choices is not None and item is not None and item not in choices:
                raise UserError(f"{where(key)}: field {key!r} expects one of "
                                f"{', '.join(map(repr, choices))}, got {quote(item)}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        key = prefix + err.field
        raise UserError(f"{where(key)}: field {key!r} {err.message}") from None


def _coerce(value: Any, tp: Any, key: str, where: Callable[[str], str]) -> Any:
    """`value` converted to annotation `tp`, or a UserError naming `key` and what was expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"{where(key)}: field {key!r} expects {_describe(tp)}, got {quote(value)}")
    text = value.strip() if isinstance(value, str) else None
    if tp is Any:
        return value
    if _is_union(tp):
        if type(None) in args and (value is None or (text or "").lower() in _NONE):
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and _is_section(options[0]):
            return _coerce(value, options[0], key, where)  # keep the section's detailed errors
        out_of_range = None
        for arg in options:
            try:
                return _coerce(value, arg, key, where)
            except _OutOfRange as err:  # the right kind of value, outside what the field can take
                out_of_range = out_of_range or err
            except UserError:
                pass
        raise out_of_range or bad
    if origin is Literal:
        for choice in args:
            if (value == choice and type(value) is type(choice)) or (text is not None and text == str(choice)):
                return choice
        raise bad
    if tp is bool:
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return bool(value)
        if text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise bad
    if tp in (int, float):
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (tp is float or type(value) is int):
            number = tp(value)
        else:
            with contextlib.suppress(ValueError, TypeError):
                number = tp(text)
        if number is None:
            raise bad
        # NaN passes every `x > 0` check and inf or a huge int ends in a traceback where torch or numpy
        # takes it (a size, a seed, a step): no field takes them, so they stop here for every config.
        if tp is float and not math.isfinite(number):
            raise _OutOfRange(f"{where(key)}: field {key!r} expects a finite number, got {quote(value)}")
        if tp is int and not INT_MIN <= number <= INT_MAX:
            raise _OutOfRange(f"{where(key)}: field {key!r} expects an integer in [-2**63, 2**63 - 1] "
                              f"(torch's int64), got {quote(value)}")
        return number
    if tp is str and isinstance(value, str):
        return value
    if tp is pathlib.Path and (text or isinstance(value, os.PathLike)):
        return pathlib.Path(value)
    if tp in (str, pathlib.Path):
        raise bad
    if text and text[0] in "[{" and (origin in (list, tuple, dict) or _is_section(tp)):
        try:
            value = yaml.safe_load(text)  # YAML flow syntax: [a, b] or {k: v}
        except yaml.YAMLError:
            raise bad from None
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args[1:] != (Ellipsis,):
            raise TypeError(f"config field {key!r}: use tuple[X, ...], not {tp!r}")
        items = [_coerce(v, args[0] if args else Any, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        key_tp, value_tp = args or (Any, Any)
        return {_coerce(str(k) if key_tp is str else k, key_tp, f"{key}.{k}", where):
                _coerce(v, value_tp, f"{key}.{k}", where) for k, v in value.items()}
    if _is_section(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad
        return _build(tp, value, where, prefix=key + ".")
    raise TypeError(f"config field {key!r} has an unsupported annotation {tp!r}")


def _describe(tp: Any) -> str:
    """What a value of annotation `tp` looks like, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if _is_union(tp):
        return " or ".join("none" if a is type(None) else _describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list (each {_describe(args[0])})" if args else "a list"
    if origin is dict:
        return f"a mapping (each value {_describe(args[1])})" if args else "a mapping"
    if _is_section(tp):
        return f"a mapping of {tp.__name__} fields"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _choices(f: dataclasses.Field, tp: Any) -> tuple:
    if "choices" in f.metadata:
        return f.metadata["choices"]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _flag_help(f: dataclasses.Field, tp: Any) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = dataclasses.MISSING
    notes = [f"choices: {', '.join(map(str, choices))}"] if (choices := _choices(f, tp)) else []
    if default is dataclasses.MISSING:
        notes.append("required")
    else:
        shown = _plain(default)
        if shown is None:
            shown = "none"
        elif tp is bool:
            shown = str(shown).lower()
        elif shown == "":
            shown = '""'  # an empty string, shown as one (not as nothing)
        notes.append(f"default: {shown}")
    return _escape(f"{f.metadata.get('help') or ''} ({'; '.join(notes)})".strip())


def _escape(text: str | None) -> str | None:
    return None if text is None else text.replace("%", "%%")  # argparse formats help with %


def _plain(value: Any) -> Any:
    if _is_section(type(value)):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
