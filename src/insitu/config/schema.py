"""Settings declared once, on the dataclass field: help, section, choices and flag aliases.

A component's settings class (``SimulationConfig``, ``ServerSettings``) declares each field with
:func:`setting`. Everything else is derived from that one declaration: the CLI flags
(``insitu.config.cli``), the TOML/JSON keys and their aliases, type checks and choice checks
(:func:`from_mapping`), and the JSON form a run saves (:func:`to_dict`). A new field is therefore a
flag, a TOML key and a ``config.json`` entry as soon as it exists.

>>> from dataclasses import dataclass
>>> @dataclass
... class Toy:
...     rounds: int = setting(5, section="run", help="Number of rounds.", aliases=("--steps",))
>>> from_mapping(Toy, {"steps": 3})
Toy(rounds=3)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

METADATA_KEY = "insitu.setting"

# Panel titles in ``--help``, in this order; a section not listed here is shown capitalized, after them.
SECTION_TITLES = {
    "data": "Data",
    "training": "Client training",
    "strategy": "Strategy and server optimizer",
    "aggregation": "Aggregation",
    "privacy": "Privacy and secure aggregation",
    "attack": "Simulated attacks",
    "systems": "Systems model and asynchronous FL",
    "run": "Run",
    "network": "Network",
    "security": "Security",
    "limits": "Fault tolerance and limits",
}

# The value types a setting may have (with ``| None``), and the plain values a dict setting may hold.
KINDS = (bool, int, float, str, Path, dict)
DICT_VALUE_TYPES = (bool, int, float, str)

Choices = Sequence[str] | Callable[[], Sequence[str]]


@dataclass(frozen=True)
class Setting:
    """What a field declares besides its type and default.

    ``choices`` is a static tuple or a function returning a registry's names (called when needed,
    so a registry filled after import is seen). ``aliases`` are further flag names (``--clients``);
    without their dashes they are also accepted as TOML keys. ``flag`` replaces the flag derived
    from the field name (``--dangerously-allow-insecure-network``). ``cli=False`` keeps the field
    out of generated flags and files: it is built by the command itself (e.g. a TLS context).
    """

    help: str
    section: str
    choices: Choices | None = None
    aliases: tuple[str, ...] = ()
    flag: str | None = None
    cli: bool = True

    def names(self) -> tuple[str, ...] | None:
        """The valid values, evaluating a registry function; None when any value of the type is fine."""
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)


def setting(default: Any = MISSING, *, help: str, section: str, choices: Choices | None = None,
            aliases: Iterable[str] = (), flag: str | None = None, cli: bool = True,
            default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field carrying its :class:`Setting` (use as ``x: int = setting(3, help=..., section=...)``)."""
    for name in (*aliases, *([flag] if flag else [])):
        if not name.startswith("--"):
            raise ValueError(f"flag names start with '--', got {name!r}")
    meta = {METADATA_KEY: Setting(help, section, choices, tuple(aliases), flag, cli)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Field:
    """One setting of a schema: name, value type (``kind``), whether None is allowed, default, declaration."""

    name: str
    kind: type
    optional: bool
    default: Any
    setting: Setting

    @property
    def flag(self) -> str:
        """The main flag: declared, or ``--`` + the name with dashes."""
        return self.setting.flag or "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        """Every flag name of the setting, main one first."""
        return (self.flag, *self.setting.aliases)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key a settings file or mapping may use for this field, its name first."""
        derived = (f.removeprefix("--").replace("-", "_") for f in self.flags)
        return tuple(dict.fromkeys((self.name, *derived)))


@functools.cache
def schema(cls: type) -> tuple[Field, ...]:
    """The declared settings of dataclass ``cls``, in field order (fields without :func:`setting` are refused)."""
    hints = typing.get_type_hints(cls)
    result = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get(METADATA_KEY)
        if declared is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with insitu.config.setting(...): give it "
                            "help text and a section, so it gets a flag and a settings-file key")
        kind, optional = _kind(hints[f.name], f"{cls.__name__}.{f.name}") if declared.cli else (object, True)
        default = f.default_factory() if callable(f.default_factory) else f.default
        result.append(Field(f.name, kind, optional, default, declared))
    _check_unique_keys(cls, result)
    return tuple(result)


def settable(cls: type) -> tuple[Field, ...]:
    """The settings of ``cls`` that flags and files can set (``cli=True``)."""
    return tuple(f for f in schema(cls) if f.setting.cli)


def key_map(cls: type) -> dict[str, str]:
    """Every accepted key (name, and aliases without dashes) -> field name."""
    return {key: f.name for f in settable(cls) for key in f.keys}


def canonical_keys(cls: type, values: Mapping[str, Any], source: str = "settings") -> dict[str, Any]:
    """``values`` with dashes turned into underscores and aliases into field names.

    An unknown key, or one field given twice under two names, is a ``ValueError`` naming ``source``,
    the key, the closest valid key and all valid keys.
    """
    keys = key_map(cls)
    result: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    unknown = []
    for key, value in values.items():
        name = keys.get(key.replace("-", "_"))
        if name is None:
            unknown.append(key)
            continue
        if name in given_as:
            raise ValueError(f"{source}: {name} is given twice, as {given_as[name]!r} and {key!r}; keep one")
        given_as[name], result[name] = key, value
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
            k.replace("-", "_"), list(keys), n=1)) else k for k in unknown]
        raise ValueError(f"{source}: unknown setting(s) {', '.join(hints)}; valid keys: "
                         f"{', '.join(f.name for f in settable(cls))}")
    return result


def from_mapping(cls: type, values: Mapping[str, Any], source: str = "settings") -> Any:
    """Build ``cls`` from keys (names, aliases, dashes or underscores) after checking each value's type
    and choices; an int is accepted for a float setting, a string for a path."""
    by_name = {f.name: f for f in settable(cls)}
    checked = {name: coerce(by_name[name], value, source)
               for name, value in canonical_keys(cls, values, source).items()}
    return cls(**checked)


def coerce(field: Field, value: Any, source: str = "settings") -> Any:
    """``value`` as ``field``'s type, or a ``ValueError`` naming the field, the expected type and the value."""
    if value is None:
        if field.optional:
            return None
        raise ValueError(f"{source}: {field.name} must be {field.kind.__name__}, got nothing (null)")
    kind = field.kind
    ok = (isinstance(value, bool) if kind is bool
          else isinstance(value, int) and not isinstance(value, bool) if kind is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, (str, Path)) if kind is Path
          else isinstance(value, kind))
    if not ok:
        raise ValueError(f"{source}: {field.name} must be {_type_name(field)}, got {value!r}")
    if kind is dict:
        bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, DICT_VALUE_TYPES)]
        if bad:
            raise ValueError(f"{source}: {field.name} maps names to numbers, strings or booleans; "
                             f"{', '.join(map(repr, bad))} do not")
        return dict(value)
    if kind in (float, Path):
        value = kind(value)
    names = field.setting.names()
    if names is not None and value not in names:
        raise ValueError(f"{source}: unknown {field.name} {value!r}; choose one of {format_choices(names)}")
    return value


def to_dict(instance: Any) -> dict[str, Any]:
    """The settable fields of ``instance`` as plain JSON values (paths as strings), in field order."""
    out: dict[str, Any] = {}
    for f in settable(type(instance)):
        value = getattr(instance, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else dict(value) if isinstance(value, dict) else value
    return out


def parse_scalar(text: str) -> bool | int | float | str:
    """A command-line value as the most specific of bool (true/false), int, float, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)  # type: ignore[no-any-return]
        except ValueError:
            pass
    return text


def format_choices(names: Sequence[str]) -> str:
    """``a, b, c`` with an empty name shown as ``''``."""
    return ", ".join(n if n else "''" for n in names)


def section_order(section: str) -> int:
    """Position of a section's panel in ``--help``: the order of :data:`SECTION_TITLES`, others last."""
    order = list(SECTION_TITLES)
    return order.index(section) if section in order else len(order)


def _kind(hint: Any, where: str) -> tuple[type, bool]:
    """(value type, None allowed) of a field annotation such as ``float``, ``str | None``, ``dict[str, int]``."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"{where}: a setting has one value type (optionally | None), got {hint}")
        hint = args[0]
    base = typing.get_origin(hint) or hint
    if base not in KINDS:
        raise TypeError(f"{where}: settings are bool, int, float, str, Path or dict, got {hint}; declare it with "
                        "cli=False if the command builds it")
    return base, optional


def _type_name(field: Field) -> str:
    names: dict[type, str] = {dict: "a table of names to values", Path: "a path"}
    name = names.get(field.kind, field.kind.__name__)
    return name + (" or nothing" if field.optional else "")


def _check_unique_keys(cls: type, fields: list[Field]) -> None:
    seen: dict[str, str] = {}
    for f in fields:
        if not f.setting.cli:
            continue
        for key in f.keys:
            if seen.setdefault(key, f.name) != f.name:
                raise TypeError(f"{cls.__name__}: key/flag {key!r} is declared by both {seen[key]} and {f.name}")
