"""Run one secure-aggregation round in-process: all clients and the server, with optional dropouts and tampering.

For tests and cost measurements. Messages cross between parties only as the protocol dataclasses, so
``wire_size`` gives the bytes a real transport would carry (plus its own framing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from insitu.privacy.secagg.messages import wire_size
from insitu.privacy.secagg.protocol import SecAggClient, SecAggConfig, SecAggError, SecAggServer

__all__ = ["STAGES", "RoundReport", "run_round"]

STAGES = ("advertise", "share", "masked", "unmask")
"""Where a client can drop: before sending its keys, its shares, its masked input, or its unmask response."""

logger = logging.getLogger("insitu")

Tamper = Callable[[str, list[Any]], list[Any]]


@dataclass
class RoundReport:
    """Outcome and costs of one simulated round."""

    total: np.ndarray
    included: tuple[int, ...]
    server: SecAggServer
    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    n_clipped: int = 0


class _Meter:
    """Per-client compute time and traffic."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}

    def call(self, cid: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one client step, timing it and counting the message it sends."""
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[cid] = self.seconds.get(cid, 0.0) + time.perf_counter() - start
        self.sent[cid] = self.sent.get(cid, 0) + wire_size(out)
        return out

    def deliver(self, cid: int, message: Any) -> Any:
        """Count a server -> client message."""
        self.received[cid] = self.received.get(cid, 0) + wire_size(message)
        return message


def run_round(
    config: SecAggConfig,
    inputs: Mapping[int, np.ndarray],
    drop_before: Mapping[str, Iterable[int]] | None = None,
    tamper: Tamper | None = None,
    server: SecAggServer | None = None,
) -> RoundReport:
    """Run all four rounds; ``drop_before[stage]`` clients go silent from that stage on; ``tamper`` edits messages.

    ``tamper(stage, messages)`` sees each stage's client messages and returns what reaches the server.
    Pass ``server`` to inspect it afterwards (e.g. after a :class:`SecAggAbort`).
    """
    drop = {stage: set((drop_before or {}).get(stage, ())) for stage in STAGES}
    unknown = set(drop_before or {}) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown dropout stages {sorted(unknown)}; use {STAGES}")
    edit: Tamper = tamper or (lambda stage, msgs: msgs)
    clients = {cid: SecAggClient(cid, config) for cid in config.client_ids}
    server = SecAggServer(config) if server is None else server
    meter, server_time = _Meter(), 0.0
    alive = set(clients)

    def step(stage: str, participants: Iterable[int], fn: Callable[[int], Any]) -> list[Any]:
        alive.difference_update(drop[stage])
        out = []
        for cid in sorted(set(participants) & alive):
            try:
                out.append(meter.call(cid, fn, cid))
            except SecAggError as exc:  # a refusing or aborting client simply goes silent
                logger.warning("secagg simulation: client %d stops at %s: %s", cid, stage, exc)
                alive.discard(cid)
        return edit(stage, out)

    def timed(fn: Callable[..., Any], *args: Any) -> Any:
        nonlocal server_time
        start = time.perf_counter()
        out = fn(*args)
        server_time += time.perf_counter() - start
        return out

    adverts = step("advertise", clients, lambda cid: clients[cid].advertise_keys())
    broadcast = timed(server.collect_keys, adverts)
    shared = step("share", (a.client_id for a in broadcast.keys),
                  lambda cid: clients[cid].share_keys(meter.deliver(cid, broadcast)))
    routed = timed(server.route_shares, shared)
    masked = step("masked", routed, lambda cid: clients[cid].masked_input(meter.deliver(cid, routed[cid]), inputs[cid]))
    request = timed(server.collect_masked, masked)
    responses = step("unmask", request.survivors, lambda cid: clients[cid].unmask(meter.deliver(cid, request)))
    total = timed(server.unmask, responses)
    return RoundReport(
        total=total,
        included=server.survivors,
        server=server,
        client_seconds=meter.seconds,
        server_seconds=server_time,
        bytes_sent=meter.sent,
        bytes_received=meter.received,
        n_clipped=sum(clients[c].n_clipped for c in server.survivors),
    )
