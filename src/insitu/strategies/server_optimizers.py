"""Server optimizers: how the aggregated client delta moves the global model.

FedAvg is plain SGD with learning rate 1 on the averaged delta; FedAvgM adds server momentum and the
adaptive variants (FedAdagrad, FedAdam, FedYogi) plug in through the same ``init``/``update`` pair, in
the style of optax. A state is None or a dict of float32 arrays (the only form ``RunStore`` persists),
and ``update`` never modifies the state it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class ServerOptimizer(Protocol):
    """``update(params, delta, state) -> (new_params, new_state)`` over flat float32 vectors.

    ``delta`` is handed over: an optimizer may overwrite it and return it as the new parameters.
    """

    def init(self, params: np.ndarray) -> Any: ...

    def update(self, params: np.ndarray, delta: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...


@dataclass(frozen=True)
class ServerSGD:
    """x <- x + lr * delta. With lr = 1 the new model is the clients' (weighted) average."""

    lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"server learning rate must be > 0, got {self.lr}")

    def init(self, params: np.ndarray) -> None:
        return None

    def update(self, params: np.ndarray, delta: np.ndarray, state: None) -> tuple[np.ndarray, None]:
        """Computed in place in ``delta`` (which the caller hands over), so no extra model copy."""
        if self.lr != 1.0:
            delta *= np.float32(self.lr)
        delta += params
        return delta, state


def sgd(lr: float = 1.0) -> ServerSGD:
    """Server SGD; ``sgd(1.0)`` is FedAvg's model averaging."""
    return ServerSGD(lr)


# -- shared helpers ------------------------------------------------------------------------------
def _check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"server learning rate must be a finite number > 0, got {lr}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _state_arrays(state: Any, keys: tuple[str, ...], params: np.ndarray, who: str) -> list[np.ndarray]:
    """The state's arrays for ``keys``, checked, so a state from another optimizer or model fails clearly."""
    if not isinstance(state, dict) or set(state) != set(keys):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{who} state must be a dict with keys {sorted(keys)}, got {got}; "
                         "was it made by another server optimizer?")
    arrays = [np.asarray(state[k]) for k in keys]
    for k, a in zip(keys, arrays):
        if a.shape != params.shape:
            raise ValueError(f"{who} state[{k!r}] has shape {a.shape}, parameters have {params.shape}")
    return arrays


# -- FedAvgM -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerMomentum:
    """FedAvgM (Hsu et al. 2019): v <- momentum * v + delta; x <- x + lr * v.

    Defaults lr = 1, momentum = 0.9 are the paper's FedAvg-with-server-momentum setting; the
    effective step is lr / (1 - momentum), so lower lr when raising momentum. State:
    ``{"momentum": v}`` (a new array each round: the caller's state is never modified, since a
    failed round keeps the previous one).
    """

    lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_unit("momentum", self.momentum)

    def init(self, params: np.ndarray) -> dict[str, np.ndarray]:
        return {"momentum": np.zeros(params.shape, np.float32)}

    def update(self, params: np.ndarray, delta: np.ndarray, state: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One new model-sized array (the momentum); the new parameters are written into ``delta``."""
        (v,) = _state_arrays(state, ("momentum",), params, "fedavgm")
        v_new = np.multiply(v, np.float32(self.momentum), dtype=np.float32)
        v_new += delta
        np.multiply(v_new, np.float32(self.lr), out=delta)
        delta += params
        return delta, {"momentum": v_new}


def fedavgm(lr: float = 1.0, momentum: float = 0.9) -> ServerMomentum:
    """FedAvgM: server SGD with heavy-ball momentum on the averaged client delta."""
    return ServerMomentum(lr, momentum)


# -- FedAdagrad / FedAdam / FedYogi --------------------------------------------------------------
ADAPTIVE_KINDS = ("adagrad", "adam", "yogi")


@dataclass(frozen=True)
class ServerAdaptive:
    """FedAdagrad / FedAdam / FedYogi exactly as Reddi et al. 2021 (ICLR), Algorithm 2.

    m_t = beta1 m_{t-1} + (1 - beta1) D_t, with D_t the averaged client delta;
    v_t = v_{t-1} + D_t^2                                     (adagrad)
    v_t = beta2 v_{t-1} + (1 - beta2) D_t^2                   (adam)
    v_t = v_{t-1} - (1 - beta2) D_t^2 sign(v_{t-1} - D_t^2)   (yogi)
    x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau).
    No bias correction (the paper has none). m_{-1} = 0 and v_{-1} = tau^2: the paper asks for
    v_{-1} >= tau^2, and the smallest allowed value adds no scale of its own (with it, the first
    step is about lr * sign(D) per coordinate for Adam/Yogi, bounded by lr / tau for all).

    Defaults (see the factories): beta1 = 0.9 and beta2 = 0.99 are the values the paper fixes in its
    experiments; tau = 1e-3 and lr = 0.1 are Flower's current FedAdam/FedAdagrad defaults (Flower
    used tau = 1e-9 before; its FedYogi defaults to lr = 0.01). The paper tunes lr (and tau) per task
    on a log grid, so treat lr as the first thing to tune. With beta1 = 0 (the FedAdagrad default)
    m_t = D_t and no ``m`` is stored. State: ``{"m": m, "v": v}`` (or ``{"v": v}``), new arrays each
    round: the caller's state is never modified, since a failed round keeps the previous one.
    """

    kind: str = "adam"
    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ADAPTIVE_KINDS:
            raise ValueError(f"adaptive kind must be one of {ADAPTIVE_KINDS}, got {self.kind!r}")
        _check_lr(self.lr)
        _check_unit("beta1", self.beta1)
        _check_unit("beta2", self.beta2)
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {self.tau}")

    @property
    def _keys(self) -> tuple[str, ...]:
        return ("m", "v") if self.beta1 > 0 else ("v",)

    def init(self, params: np.ndarray) -> dict[str, np.ndarray]:
        state = {"v": np.full(params.shape, np.float32(self.tau) ** 2, np.float32)}
        if self.beta1 > 0:
            state["m"] = np.zeros(params.shape, np.float32)
        return state

    def update(self, params: np.ndarray, delta: np.ndarray, state: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Float32, in place: two new model-sized arrays (the new m and v); no other temporaries."""
        arrays = _state_arrays(state, self._keys, params, f"fed{self.kind}")
        m, v = arrays if self.beta1 > 0 else (None, arrays[0])
        f32 = np.float32
        v_new = np.square(delta, dtype=np.float32)  # D^2 for now
        work = np.empty_like(v_new)  # scratch, then the new m
        if self.kind == "adagrad":
            v_new += v
        elif self.kind == "adam":
            np.multiply(v, f32(self.beta2), out=work)
            v_new *= f32(1.0 - self.beta2)
            v_new += work
        else:  # yogi
            np.subtract(v, v_new, out=work)
            np.sign(work, out=work)
            work *= v_new
            work *= f32(1.0 - self.beta2)
            np.subtract(v, work, out=v_new)
        if m is not None:
            m_new, free = work, delta
            np.multiply(m, f32(self.beta1), out=m_new)
            delta *= f32(1.0 - self.beta1)
            m_new += delta  # delta is free from here on
            numerator = m_new
        else:
            numerator, free = delta, work  # m_t = D_t
        np.sqrt(v_new, out=free)
        free += f32(self.tau)
        np.divide(numerator, free, out=delta)
        delta *= f32(self.lr)
        delta += params
        new_state = {"v": v_new} if m is None else {"m": m_new, "v": v_new}
        return delta, new_state


def fedadam(lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> ServerAdaptive:
    """FedAdam (Reddi et al. 2021): Adam on the server over the averaged client delta."""
    return ServerAdaptive("adam", lr, beta1, beta2, tau)


def fedyogi(lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> ServerAdaptive:
    """FedYogi (Reddi et al. 2021): Yogi's additive, sign-controlled second moment; steadier than Adam."""
    return ServerAdaptive("yogi", lr, beta1, beta2, tau)


def fedadagrad(lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3) -> ServerAdaptive:
    """FedAdagrad (Reddi et al. 2021): accumulated squared deltas; beta1 = 0 means no momentum."""
    return ServerAdaptive("adagrad", lr, beta1, 0.0, tau)


# -- by name -------------------------------------------------------------------------------------
SERVER_OPTIMIZER_NAMES = ("sgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def make_server_optimizer(
    name: str,
    *,
    lr: float | None = None,
    momentum: float = 0.9,
    beta1: float | None = None,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> ServerOptimizer:
    """A server optimizer by name (for CLIs and configs); None lr/beta1 mean that optimizer's default."""
    if name == "sgd":
        return sgd(1.0 if lr is None else lr)
    if name == "fedavgm":
        return fedavgm(1.0 if lr is None else lr, momentum)
    if name in ("fedadam", "fedyogi"):
        factory = fedadam if name == "fedadam" else fedyogi
        return factory(0.1 if lr is None else lr, 0.9 if beta1 is None else beta1, beta2, tau)
    if name == "fedadagrad":
        return fedadagrad(0.1 if lr is None else lr, 0.0 if beta1 is None else beta1, tau)
    raise ValueError(f"unknown server optimizer {name!r}; valid names: {', '.join(SERVER_OPTIMIZER_NAMES)}")
