"""Aggregators by name: factories register themselves; every module in ``insitu/aggregation/rules/``
is imported on first use, so adding a file there adds an aggregator to the CLI and TOML.

``make_reducer("krum", byzantine_f=2, clip_norm=5.0, screen=True)`` builds
``pipeline(pre=[clip(5.0), screen(10.0)], reduce=krum(f=2))``. A factory's parameters are its
options: ``make_reducer("multi_krum", m=3)``; an option it does not declare is refused.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from insitu.aggregation.base import Reducer

Factory = Callable[..., Reducer]
F = TypeVar("F", bound=Factory)

_FACTORIES: dict[str, Factory] = {}
_discovered = False


def register(name: str) -> Callable[[F], F]:
    """Decorator: make the factory available as aggregator ``name`` (its parameters are its options)."""

    def add(factory: F) -> F:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"aggregator {name!r} is registered twice ({_FACTORIES[name].__module__} and "
                             f"{factory.__module__}): rename one")
        _FACTORIES[name] = factory
        return factory

    return add


def _discover() -> None:
    """Import every module of ``insitu.aggregation.rules`` once (each registers its aggregator)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from insitu.aggregation import rules

    for module in pkgutil.iter_modules(rules.__path__, f"{rules.__name__}."):
        importlib.import_module(module.name)


def aggregator_names() -> tuple[str, ...]:
    """Every registered aggregator, in registration order (built-ins first)."""
    _discover()
    return tuple(_FACTORIES)


def aggregator_options(name: str) -> tuple[str, ...]:
    """The options (factory parameters) aggregator ``name`` accepts."""
    return tuple(inspect.signature(_factory(name)).parameters)


def _factory(name: str) -> Factory:
    _discover()
    if name not in _FACTORIES:
        raise ValueError(f"unknown aggregator {name!r}; choose one of: {', '.join(_FACTORIES)}")
    return _FACTORIES[name]


def _coerce(factory: Factory, key: str, value: Any) -> Any:
    """A string option from the CLI (``--aggregator-option m=3``) converted to the parameter's type."""
    if not isinstance(value, str):
        return value
    hint = typing.get_type_hints(factory).get(key)
    for kind in (int, float):
        if hint is kind or kind in typing.get_args(hint):
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def make_reducer(name: str, *, byzantine_f: int = 0, trim_fraction: float = 0.1, clip_norm: float = 0.0,
                 screen: bool = False, **options: Any) -> Reducer:
    """The named aggregator, optionally clipped (first) and screened, as one pipeline.

    ``byzantine_f`` (as ``f``) and ``trim_fraction`` (as ``beta``) reach only the rules that declare
    them; ``options`` go to the factory and must be among its parameters. ``clip_norm`` 0 means no
    clipping. The result declares ``properties`` (``min_updates``: 1 for the mean).
    """
    from insitu.aggregation.clip import clip
    from insitu.aggregation.pipeline import pipeline
    from insitu.aggregation.robust import check_count
    from insitu.aggregation.screen import screen as screen_stage

    check_count("byzantine_f", byzantine_f)
    if isinstance(clip_norm, bool) or not 0.0 <= clip_norm < math.inf:
        raise ValueError(f"clip_norm must be >= 0 (0 disables clipping), got {clip_norm!r}")
    factory = _factory(name)
    declared = aggregator_options(name)
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ValueError(f"aggregator {name!r} has no option {', '.join(map(repr, unknown))}; its options are: "
                         f"{', '.join(declared) or 'none'}")
    shared = {"f": byzantine_f, "beta": trim_fraction}  # run-wide settings, for the rules that declare them
    kwargs = {key: value for key, value in shared.items() if key in declared}
    kwargs.update({key: _coerce(factory, key, value) for key, value in options.items()})
    reducer = factory(**kwargs)
    pre = ([clip(clip_norm)] if clip_norm > 0 else []) + ([screen_stage()] if screen else [])
    return pipeline(pre=pre, reduce=reducer) if pre else reducer
