"""Typer options generated from a settings schema (see ``insitu.config.schema``).

:func:`with_settings` turns a command ``f(..., settings: dict[str, Any])`` into one that has a flag
for every declared field: ``--x/--no-x`` for a bool, a typed option for int, float, str and paths,
and a repeatable ``--flag KEY=VALUE`` for a dict. Every generated flag defaults to "not given", so
the command receives only the settings the user typed (and can layer them over presets and files);
each lands in the ``--help`` panel of its section.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

import typer
from rich.markup import escape

from insitu.config.schema import (
    SECTION_TITLES,
    Field,
    format_choices,
    parse_scalar,
    section_order,
    settable,
)


def selected(cls: type, include: Iterable[str] | None = None) -> list[Field]:
    """The settable fields of ``cls`` (only ``include``'s, if given), ordered by section for ``--help``."""
    fields = settable(cls)
    if include is not None:
        wanted = set(include)
        missing = wanted - {f.name for f in fields}
        if missing:
            raise TypeError(f"{cls.__name__} has no setting(s) {', '.join(sorted(missing))}")
        fields = tuple(f for f in fields if f.name in wanted)
    return sorted(fields, key=lambda f: section_order(f.setting.section))


def help_text(field: Field, override: str | None = None) -> str:
    """The field's help, then its choices and its default; a command's ``override`` of the help text says the
    default itself (a server's differ from the schema's)."""
    parts = [override or field.setting.help]
    names = field.setting.names()
    if names is not None:
        parts.append(f"One of: {format_choices(names)}.")
    if field.kind is dict:
        parts.append("Repeatable KEY=VALUE; the value is read as a number, true/false, or text.")
    default = field.default
    if override is None and default not in (None, {}) and not (field.kind is bool and default is False):
        parts.append(f"(default: {default if default != '' else repr(default)})")
    return " ".join(parts)


def flags_of(field: Field, extra: Iterable[str] = ()) -> list[str]:
    """The option declarations of ``field``: ``--x/--no-x`` pairs for a bool, else the names."""
    names = [*field.flags, *extra]
    if field.kind is bool:
        return [f"{n}/--no-{n.removeprefix('--')}" for n in names]
    return names


def option_parameter(field: Field, extra_flags: Iterable[str] = (), help_override: str | None = None) -> inspect.Parameter:
    """One keyword parameter whose typer option (default None: not given) sets ``field``."""
    kind: Any = {dict: list[str], bool: bool}.get(field.kind, field.kind)
    option = typer.Option(  # in Annotated the positional arguments are the flag names; the default is None below
        *flags_of(field, extra_flags), help=escape(help_text(field, help_override)), show_default=False,
        rich_help_panel=SECTION_TITLES.get(field.setting.section, field.setting.section.capitalize()),
        metavar="KEY=VALUE" if field.kind is dict else None,
    )
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])


def parse_pairs(field: Field, items: Iterable[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` given to a dict setting's flag as ``{"a": 1, "b": "x"}``; a later key wins."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r} (e.g. {field.flag} name=0.5)",
                                     param_hint=field.flag)
        out[key.strip()] = parse_scalar(value.strip())
    return out


def with_settings(cls: type, *, param: str = "settings", include: Iterable[str] | None = None,
                  aliases: Mapping[str, Iterable[str]] | None = None,
                  help: Mapping[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command a flag per setting of ``cls`` and pass the given ones as ``param`` (a dict).

    ``include`` limits the flags to those fields (a server takes only the settings it honours);
    ``aliases`` and ``help`` add command-specific flag names and help texts by field name.
    """
    fields = selected(cls, include)
    aliases, help = dict(aliases or {}), dict(help or {})
    unknown = (set(aliases) | set(help)) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"aliases/help given for {', '.join(sorted(unknown))}, which are not among the flags")

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        if param not in signature.parameters:
            raise TypeError(f"{command.__name__} must take a {param!r} parameter to receive the settings")
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values() if p.name != param]
        clash = {p.name for p in own} & {f.name for f in fields}
        if clash:
            raise TypeError(f"{command.__name__}: parameter(s) {', '.join(sorted(clash))} clash with {cls.__name__} "
                            "settings of the same name")
        generated = [option_parameter(f, aliases.get(f.name, ()), help.get(f.name)) for f in fields]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given: dict[str, Any] = {}
            for f in fields:
                value = kwargs.pop(f.name)
                if value is not None:
                    given[f.name] = parse_pairs(f, value) if f.kind is dict else value
            return command(**kwargs, **{param: given})

        wrapper.__signature__ = signature.replace(parameters=[*own, *generated])  # type: ignore[attr-defined]
        return wrapper

    return decorate


def markdown_table(cls: type, include: Iterable[str] | None = None, aliases: Mapping[str, Iterable[str]] | None = None,
                   help: Mapping[str, str] | None = None) -> str:
    """A Markdown table of the flags, TOML keys and meaning of ``cls``'s settings, one row per field, by section
    (``include``, ``aliases`` and ``help`` as for :func:`with_settings`)."""
    aliases, help = aliases or {}, help or {}
    rows = ["| flag | TOML key | meaning |", "|---|---|---|"]
    section = None
    for f in selected(cls, include):
        if f.setting.section != section:
            section = f.setting.section
            rows.append(f"| **{SECTION_TITLES.get(section, section.capitalize())}** | | |")
        flags = ", ".join(f"`{n}`" for n in [*f.flags, *aliases.get(f.name, ())])
        keys = ", ".join(f"`{k}`" for k in f.keys)
        rows.append(f"| {flags} | {keys} | {help_text(f, help.get(f.name)).replace('|', chr(92) + '|')} |")
    return "\n".join(rows)

