"""Run a Flower ``NumPyClient`` as an insitu :class:`~insitu.client.api.Client`, without flwr installed.

Flower clients exchange plain lists of numpy arrays (a model's ``state_dict`` values, in order) and
return ``(arrays, num_examples, metrics)`` from ``fit`` and ``(loss, num_examples, metrics)`` from
``evaluate``. insitu exchanges named :class:`~insitu.params.Parameters`. The adapter maps the list
positionally onto the server's names, and treats everything the Flower client returns as untrusted:
the count, shape, dtype and finiteness of every array, the example count and the metrics are checked,
and a mismatch raises :class:`FlowerClientError` naming the array or value (the round then rejects this
client's result, as for any bad update). Nothing here imports flwr: any object with the methods works
(duck typing), including what flwr's ``NumPyClient.to_client()`` returns (its ``.numpy_client``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

from insitu.client.api import Client, Config, EvalResult, FitResult, Metrics
from insitu.params import Parameters, ParamSpec

FlowerScalar = bool | bytes | float | int | str
FlowerConfig = dict[str, FlowerScalar]


class FlowerClientError(ValueError):
    """A Flower client returned something insitu cannot use (wrong arrays, a bad count, bad metrics)."""


@runtime_checkable
class NumPyClientLike(Protocol):
    """What the adapter needs of a Flower ``NumPyClient`` (``set_parameters`` is optional: ``fit`` and
    ``evaluate`` receive the parameters)."""

    def get_parameters(self, config: FlowerConfig) -> list[np.ndarray]: ...

    def fit(self, parameters: list[np.ndarray], config: FlowerConfig) -> tuple[list[np.ndarray], int, dict[str, Any]]: ...

    def evaluate(self, parameters: list[np.ndarray], config: FlowerConfig) -> tuple[float, int, dict[str, Any]]: ...


def is_flower_client(obj: object) -> bool:
    """Whether ``obj`` is a Flower-style client: a ``NumPyClient`` (it has ``get_parameters``, which an
    insitu ``Client`` does not need) or a ``to_client()`` result wrapping one (``.numpy_client``)."""
    if getattr(obj, "numpy_client", None) is not None:
        return True
    return all(callable(getattr(obj, name, None)) for name in ("get_parameters", "fit", "evaluate"))


def unwrap(obj: object) -> NumPyClientLike:
    """The ``NumPyClient`` inside ``obj``: ``obj`` itself, or what a ``to_client()`` result wraps.

    A Flower ``Client`` written directly against ``FitIns``/``FitRes`` (not a ``NumPyClient``) is
    refused: it needs flwr's message types, which insitu does not use.
    """
    inner = getattr(obj, "numpy_client", None)
    candidate = inner if inner is not None else obj
    kind = type(obj).__name__
    if isinstance(candidate, NumPyClientLike) and not _fit_takes_one_argument(candidate):
        return candidate
    if callable(getattr(obj, "get_properties", None)) or _fit_takes_one_argument(candidate):
        raise TypeError(f"{kind} is a Flower Client working on FitIns/FitRes messages; insitu runs Flower "
                        "NumPyClients (get_parameters, fit and evaluate on lists of numpy arrays): subclass "
                        "NumPyClient instead, or write an insitu Client (insitu.client.api)")
    missing = [name for name in ("get_parameters", "fit", "evaluate") if not callable(getattr(candidate, name, None))]
    raise TypeError(f"{kind} is not a Flower NumPyClient: it lacks {', '.join(missing)}")


def _fit_takes_one_argument(client: object) -> bool:
    """Whether ``client.fit`` takes a single argument (Flower's ``Client.fit(ins: FitIns)``) rather than a
    NumPyClient's ``fit(parameters, config)``; False when the signature cannot be read or takes ``*args``."""
    try:
        parameters = list(inspect.signature(getattr(client, "fit")).parameters.values())  # noqa: B009
    except (TypeError, ValueError, AttributeError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1


class NumPyClientAdapter:
    """An insitu ``Client`` that runs a Flower ``NumPyClient``.

    ``fit``/``evaluate`` hand the client the global parameters as a list of fresh arrays (in the
    server's order) and the task's scalar settings as Flower's ``config`` dict (``local_epochs``,
    ``lr``, ``batch_size``, ... as the server sends them, plus ``seed``).

    ``seed_globals`` (simulation only: :class:`FlowerClientFn` sets it): before calling the client,
    torch's, numpy's and Python's global generators are seeded with the task's ``seed``, so a
    simulation of clients that shuffle with them (``DataLoader(shuffle=True)``) is reproducible. Off by
    default, and always off for deployed clients (:mod:`insitu.flower.start`): there the seed comes from
    the server, which would then know every number the client draws from those generators, its own
    privacy noise included (protective randomness never comes from the server's seed).

    ``precheck`` (deployment): before the first task, compare the client's own ``get_parameters({})``
    with the server's arrays, so a client built for another architecture gets an error naming the
    server's ``--model`` rather than torch's ``load_state_dict`` message.
    """

    def __init__(self, client: object, *, precheck: bool = False, server_model: str = "",
                 seed_globals: bool = False) -> None:
        self.client = unwrap(client)
        self.precheck = precheck
        self.server_model = server_model
        self.seed_globals = seed_globals

    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        """Train with the Flower client; its returned arrays are checked against ``parameters``' specs."""
        self._check_architecture(parameters)
        flower_config = _flower_config(config)
        if self.seed_globals:
            _seed(config)
        returned = self.client.fit(_to_ndarrays(parameters), flower_config)
        arrays, num_examples, metrics = _triple(returned, "fit", "(parameters, num_examples, metrics)")
        new = to_parameters(arrays, parameters.specs, what="fit")
        return FitResult(new, _count(num_examples, "fit"), _metrics(metrics, "fit"))

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        """Evaluate with the Flower client: ``(loss, num_examples, metrics)`` checked and converted."""
        self._check_architecture(parameters)
        if self.seed_globals:
            _seed(config)
        returned = self.client.evaluate(_to_ndarrays(parameters), _flower_config(config))
        loss, num_examples, metrics = _triple(returned, "evaluate", "(loss, num_examples, metrics)")
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
            raise FlowerClientError(f"the Flower client's evaluate returned loss {loss!r} "
                                    f"({type(loss).__name__}); it must be a number")
        return EvalResult(float(loss), _count(num_examples, "evaluate"), _metrics(metrics, "evaluate"))

    def _check_architecture(self, parameters: Parameters) -> None:
        if not self.precheck:
            return
        self.precheck = False
        own = self.client.get_parameters({})
        try:
            to_parameters(own, parameters.specs, what="get_parameters")
        except FlowerClientError as error:
            model = f" ({self.server_model})" if self.server_model else ""
            raise FlowerClientError(f"this Flower client's model does not fit the one the server trains{model}: "
                                    f"{error}. Start `insitu server` with the --model whose parameters are the "
                                    f"client's (insitu server --help lists them)") from None


def to_parameters(arrays: object, specs: Sequence[ParamSpec], *, what: str) -> Parameters:
    """Map a Flower client's list of arrays positionally onto ``specs`` (names, shapes, dtypes).

    Each array must have its slot's shape and a dtype of the same kind (float for float, integer for
    integer); it is cast to the slot's dtype. Float arrays must be finite (also after the cast, so a
    float64 value too large for float32 is refused). Raises :class:`FlowerClientError` naming the array.
    """
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        raise FlowerClientError(f"the Flower client's {what} returned {type(arrays).__name__} for the parameters; "
                                "it must be a list of numpy arrays (the model's state_dict values, in order)")
    if len(arrays) != len(specs):
        listing = ", ".join(f"{s.name} {s.shape}" for s in specs)
        raise FlowerClientError(f"the Flower client's {what} returned {len(arrays)} arrays, but the server's model "
                                f"has {len(specs)}: {listing}")
    out: dict[str, np.ndarray] = {}
    for index, (value, spec) in enumerate(zip(arrays, specs)):
        where = f"array {index} ({spec.name!r})"
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if not isinstance(value, (np.ndarray, np.generic)):
            raise FlowerClientError(f"the Flower client's {what} returned {type(value).__name__} as {where}; "
                                    "it must be a numpy array")
        array = np.asarray(value)
        if tuple(array.shape) != tuple(spec.shape):
            raise FlowerClientError(f"the Flower client's {what} returned shape {tuple(array.shape)} for {where}, "
                                    f"which has shape {tuple(spec.shape)} on the server")
        if array.dtype.kind not in _KINDS[spec.dtype.kind]:
            raise FlowerClientError(f"the Flower client's {what} returned dtype {array.dtype} for {where}, which "
                                    f"is {spec.dtype} on the server")
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise FlowerClientError(f"the Flower client's {what} returned non-finite values (nan or inf) in {where}")
        with np.errstate(over="ignore"):
            cast = array.astype(spec.dtype, copy=True)
        if spec.dtype.kind == "f" and not np.isfinite(cast).all():
            raise FlowerClientError(f"the Flower client's {what} returned values in {where} too large for "
                                    f"{spec.dtype}")
        if spec.dtype.kind in "iub" and not np.array_equal(cast, array):
            raise FlowerClientError(f"the Flower client's {what} returned values in {where} outside {spec.dtype}")
        out[spec.name] = cast
    return Parameters.from_arrays(out)


_KINDS = {"f": "f", "c": "c", "i": "iu", "u": "iu", "b": "b"}
"""Which numpy dtype kinds a returned array may have, by the kind of the server's array."""


def initial_parameters(client: object) -> Parameters:
    """A Flower client's ``get_parameters({})`` as insitu Parameters named "0", "1", ... (Flower's way of
    starting a run when the strategy is given no initial parameters); the arrays are checked as in fit."""
    arrays = unwrap(client).get_parameters({})
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        raise FlowerClientError(f"the Flower client's get_parameters returned {type(arrays).__name__}; it must be "
                                "a list of numpy arrays")
    specs = []
    for index, value in enumerate(arrays):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if not isinstance(value, (np.ndarray, np.generic)) or np.asarray(value).dtype.kind not in "fiub":
            raise FlowerClientError(f"the Flower client's get_parameters returned {type(value).__name__} as array "
                                    f"{index}; it must be a numeric numpy array")
        array = np.asarray(value)
        specs.append(ParamSpec(str(index), tuple(array.shape), array.dtype))
    return to_parameters(arrays, specs, what="get_parameters")


@dataclass
class Context:
    """What newer Flower passes a ``client_fn(context)``: insitu fills ``node_id`` (the client id as an int)
    and ``node_config``'s ``partition-id`` and ``num-partitions``, as Flower's simulation does; ``run_config``
    (``pyproject.toml``'s ``[tool.flwr.app.config]`` in Flower) is empty, ``state`` a plain dict."""

    run_id: int
    node_id: int
    node_config: dict[str, FlowerScalar]
    state: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, FlowerScalar] = field(default_factory=dict)


class FlowerClientFn:
    """A simulation ``client_fn`` that accepts Flower-style clients: ``client_fn(cid)`` may return a
    ``NumPyClient`` (or its ``to_client()``), which is wrapped in a :class:`NumPyClientAdapter`, or an
    insitu ``Client``, which is returned as is. A ``client_fn(context)`` (newer Flower: its parameter is
    named ``context`` or annotated ``Context``) gets a :class:`Context` for client ``cid`` of
    ``num_clients``. A class rather than a closure so process engines can pickle it (with a picklable
    ``client_fn``)."""

    def __init__(self, client_fn: Callable[[Any], object], num_clients: int | None = None) -> None:
        self.client_fn = client_fn
        self.num_clients = num_clients
        self.takes_context = _takes_context(client_fn)
        if self.takes_context and num_clients is None:
            raise ValueError("a client_fn(context) needs the number of clients for context.node_config"
                             "['num-partitions']: pass num_clients")

    def make(self, cid: str) -> object:
        """What the user's ``client_fn`` returns for client ``cid`` (not yet adapted)."""
        if not self.takes_context:
            return self.client_fn(cid)
        number = int(cid) if cid.isdigit() else zlib.crc32(cid.encode())
        return self.client_fn(Context(run_id=0, node_id=number,
                                      node_config={"partition-id": number, "num-partitions": self.num_clients or 0}))

    def __call__(self, cid: str) -> Client:
        made = self.make(cid)
        if getattr(made, "get_parameters", None) is None and getattr(made, "numpy_client", None) is None \
                and callable(getattr(made, "evaluate", None)) and callable(getattr(made, "fit", None)):
            return cast(Client, made)  # an insitu Client: the cheap path (no Protocol isinstance per client)
        if is_flower_client(made):
            return NumPyClientAdapter(made, seed_globals=True)  # simulation: same seed, same result
        if isinstance(made, Client):
            return made
        raise TypeError(f"client_fn({cid!r}) returned {type(made).__name__}, which is neither an insitu Client "
                        "(fit and evaluate on Parameters) nor a Flower NumPyClient (get_parameters, fit, evaluate)")


def adapt_client_fn(client_fn: Callable[[Any], Any], num_clients: int | None = None) -> FlowerClientFn:
    """``client_fn`` made to return insitu Clients (see :class:`FlowerClientFn`); idempotent."""
    return client_fn if isinstance(client_fn, FlowerClientFn) else FlowerClientFn(client_fn, num_clients)


def _takes_context(client_fn: Callable[[Any], Any]) -> bool:
    """Whether ``client_fn`` is newer Flower's ``client_fn(context: Context)`` rather than ``client_fn(cid)``."""
    try:
        parameters = list(inspect.signature(client_fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not parameters:
        return False
    first = parameters[0]
    annotation = first.annotation if isinstance(first.annotation, str) else getattr(first.annotation, "__name__", "")
    return first.name == "context" or annotation.split(".")[-1] == "Context"


def _to_ndarrays(parameters: Parameters) -> list[np.ndarray]:
    """The global arrays as fresh copies: a Flower client may change them in place, insitu's must not change."""
    return [np.array(a, copy=True) for a in parameters.arrays]


def _flower_config(config: Config) -> FlowerConfig:
    """insitu's task settings as Flower's config dict: the scalars, unchanged. Named arrays (an algorithm's
    state such as SCAFFOLD's control variate) have no Flower equivalent, so such a task is refused."""
    arrays = sorted(k for k, v in config.items() if isinstance(v, Parameters))
    if arrays:
        raise FlowerClientError(f"this task sends named arrays ({', '.join(arrays)}), which a Flower NumPyClient "
                                f"cannot use (algorithm {config.get('algorithm', '?')!r}): run FedAvg-style "
                                "strategies with Flower clients, or port the client to insitu's Client")
    return {k: v for k, v in config.items() if not isinstance(v, Parameters)}


def _seed(config: Config) -> None:
    """Seed the global generators a Flower client shuffles with from the task's seed (when it has one)."""
    seed = config.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)


def _triple(returned: object, method: str, shape: str) -> tuple[Any, Any, Any]:
    if not isinstance(returned, (tuple, list)) or len(returned) != 3:
        raise FlowerClientError(f"the Flower client's {method} returned {type(returned).__name__}"
                                f"{'' if not isinstance(returned, (tuple, list)) else f' of {len(returned)}'}; "
                                f"it must return a tuple {shape}")
    return returned[0], returned[1], returned[2]


def _count(value: object, method: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise FlowerClientError(f"the Flower client's {method} returned num_examples {value!r}; it must be an "
                                "int >= 0 (how many local examples it used)")
    return int(value)


def _metrics(value: object, method: str) -> Metrics:
    """Flower metrics as insitu's: a dict of names to real numbers (cast to float)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FlowerClientError(f"the Flower client's {method} returned metrics of type {type(value).__name__}; "
                                "they must be a dict of names to numbers")
    out: Metrics = {}
    for name, metric in value.items():
        if not isinstance(name, str):
            raise FlowerClientError(f"the Flower client's {method} returned a metric named {name!r}; names must be "
                                    "strings")
        if isinstance(metric, np.ndarray) and metric.shape == ():
            metric = metric.item()
        if not isinstance(metric, numbers.Real):
            raise FlowerClientError(f"the Flower client's {method} returned metric {name!r} = {metric!r} "
                                    f"({type(metric).__name__}); insitu metrics are numbers (int, float or bool)")
        number = float(metric)
        if not math.isfinite(number):
            raise FlowerClientError(f"the Flower client's {method} returned metric {name!r} = {number}; metrics "
                                    "must be finite")
        out[name] = number
    return out
