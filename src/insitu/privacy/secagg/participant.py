"""A client's side of secure aggregation over a network: train, then answer the protocol's steps.

The server drives a secure round as four tasks per client (:data:`STEPS`). "train" runs the user's
unchanged ``Client.fit`` and keeps the update on the client, answering with fresh public keys;
"share", "masked" and "unmask" answer the protocol messages. Only the masked vector, encrypted
shares and the shares the protocol reveals leave the client; the update itself never does.
Messages travel as :mod:`~insitu.privacy.secagg.codec` bytes in a one-array ``Parameters`` named
:data:`MESSAGE` (never pickled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from insitu.client.api import Client, Config, ProtocolReply
from insitu.params import Parameters, describe_mismatch
from insitu.privacy.distributed import check_field, distributed_input, os_entropy_rng
from insitu.privacy.secagg import codec
from insitu.privacy.secagg.messages import KeyBroadcast, RoutedShares, UnmaskRequest
from insitu.privacy.secagg.protocol import SecAggClient, SecAggConfig, SecAggRefused
from insitu.privacy.secure import secure_input

__all__ = ["MESSAGE", "STEP", "STEPS", "SecAggParticipant", "message_bytes", "message_parameters", "protocol_keys"]

STEP = "secagg_step"
STEPS = ("train", "share", "masked", "unmask")
MESSAGE = "secagg_message"
SESSION = "secagg_session"
PREFIX = "secagg_"


def message_parameters(data: bytes) -> Parameters:
    """Protocol bytes as a one-array ``Parameters`` (uint8), so they stream like any named extra."""
    return Parameters.from_arrays({"bytes": np.frombuffer(data, dtype=np.uint8)})


def message_bytes(value: object) -> bytes:
    """The protocol bytes carried by :func:`message_parameters`; anything else is refused."""
    if not isinstance(value, Parameters) or value.names != ("bytes",):
        raise ValueError(f"a secure-aggregation message must be one uint8 array named 'bytes', got {value!r}")
    array = value.arrays[0]
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(f"a secure-aggregation message must be a 1-D uint8 array, got {array.dtype} {array.shape}")
    return array.tobytes()


def protocol_keys(config: SecAggConfig) -> dict[str, int | float]:
    """The public round parameters as task config entries."""
    return {SESSION: config.session, "secagg_n": config.n, "secagg_t": config.t, "secagg_dim": config.dim,
            "secagg_bound": config.bound, "secagg_degree": config.degree or 0, "secagg_integer": int(config.integer)}


def _protocol_config(config: Config) -> SecAggConfig:
    try:
        degree = int(config["secagg_degree"])  # type: ignore[arg-type]
        return SecAggConfig(int(config["secagg_n"]), int(config["secagg_t"]), int(config["secagg_dim"]),  # type: ignore[arg-type]
                            float(config["secagg_bound"]), session=int(config[SESSION]),  # type: ignore[arg-type]
                            degree=degree or None, integer=bool(int(config.get("secagg_integer", 0))))  # type: ignore[arg-type]
    except KeyError as missing:
        raise ValueError(f"secure-aggregation task lacks {missing}") from None


@dataclass
class _Round:
    session: int
    protocol: SecAggClient
    delta: np.ndarray | None
    num_examples: int


class SecAggParticipant:
    """Wraps a user's ``Client`` for secure rounds; one round at a time (a new "train" step replaces it).

    ``min_noise_multiplier`` z: this client takes part only under distributed DP whose noise, if every
    client of the round adds its share, is at least z times the scaled clip norm (sqrt(n v) >= z gamma C
    for n clients each adding variance v). It then refuses any other masked input, and sends neither
    its example count nor its metrics in the clear: a guard against a server that would ask for less
    noise than announced. Its own share is always added, whatever the others do.
    """

    def __init__(self, client: Client, *, min_noise_multiplier: float | None = None) -> None:
        if min_noise_multiplier is not None and not min_noise_multiplier > 0:
            raise ValueError(f"min_noise_multiplier must be > 0, got {min_noise_multiplier}")
        self.client = client
        self.min_noise_multiplier = min_noise_multiplier
        self._round: _Round | None = None

    def handle(self, parameters: Parameters | None, config: Config) -> ProtocolReply:
        """Answer one step of a secure round; protocol refusals raise :class:`SecAggRefused`."""
        step = config.get(STEP)
        if step == "train":
            if parameters is None:
                raise ValueError("the secure-aggregation train step needs the global parameters")
            return self._train(parameters, config)
        if step not in STEPS:
            raise ValueError(f"unknown secure-aggregation step {step!r}; expected one of {STEPS}")
        current = self._round
        if current is None or config.get(SESSION) != current.session:
            raise SecAggRefused(f"no secure round {config.get(SESSION)!r} in progress on this client (it may have "
                                "restarted since training); it sits this round out")
        data = message_bytes(config.get(MESSAGE))
        protocol = current.protocol
        if step == "share":
            reply = protocol.share_keys(codec.decode(data, KeyBroadcast))
        elif step == "masked":
            reply = protocol.masked_input(codec.decode(data, RoutedShares), self._input(current, config,
                                                                                        self.min_noise_multiplier))
            current.delta = None
        else:
            reply = protocol.unmask(codec.decode(data, UnmaskRequest))
            self._round = None
        return ProtocolReply(codec.encode(reply))

    def _train(self, parameters: Parameters, config: Config) -> ProtocolReply:
        protocol_config = _protocol_config(config)
        if protocol_config.dim != parameters.num_values + 1:
            raise ValueError(f"secure round over {protocol_config.dim} values for a model of {parameters.num_values} "
                             "(expected one more, for the weight)")
        protocol = SecAggClient(int(config["secagg_id"]), protocol_config)  # type: ignore[arg-type]
        self._round = None
        result = self.client.fit(parameters, {k: v for k, v in config.items() if not k.startswith(PREFIX)})
        mismatch = describe_mismatch(result.parameters.specs, parameters.specs)
        if mismatch:
            raise ValueError(f"the client's update does not match the global model: {mismatch}")
        if result.extras:
            raise ValueError(f"secure aggregation hides only the update, but fit returned extras "
                             f"{sorted(result.extras)} that would have to travel in the clear")
        delta = result.parameters.flat() - parameters.flat()
        self._round = _Round(protocol_config.session, protocol, delta, int(result.num_examples))
        if self.min_noise_multiplier is not None:  # nothing about this client's data leaves it un-noised
            return ProtocolReply(codec.encode(protocol.advertise_keys()), 0, {})
        return ProtocolReply(codec.encode(protocol.advertise_keys()), int(result.num_examples), dict(result.metrics))

    @staticmethod
    def _input(current: _Round, config: Config, min_noise_multiplier: float | None = None) -> np.ndarray:
        """This client's protocol input: weighted delta, or clipped delta under central DP."""
        assert current.delta is not None
        bound = current.protocol.config.bound
        if "secagg_dp_gamma" in config:
            return SecAggParticipant._distributed_input(current, config, min_noise_multiplier)
        if min_noise_multiplier is not None:
            raise ValueError(f"this client takes part only under distributed DP (noise multiplier >= "
                             f"{min_noise_multiplier:g}), but the server asked for a masked input without client noise")
        if "secagg_clip_norm" in config:
            return secure_input(current.delta, bound=bound, clip_norm=float(config["secagg_clip_norm"]))  # type: ignore[arg-type]
        if "secagg_weight_scale" not in config:
            raise ValueError("the masked-input step names neither a weight scale nor a clip norm")
        scale = float(config["secagg_weight_scale"])  # type: ignore[arg-type]
        return secure_input(current.delta, bound=bound, weight=current.num_examples * scale)

    @staticmethod
    def _distributed_input(current: _Round, config: Config, min_noise_multiplier: float | None = None) -> np.ndarray:
        """Distributed DP: clip, scale, round and add this client's Skellam noise share, all here.

        The noise always comes from this machine's OS entropy (never a seed from the server). The server's
        numbers are checked: an integer round, a positive noise variance, and a sum that fits the field.
        """
        assert current.delta is not None
        protocol_config = current.protocol.config
        if not protocol_config.integer:
            raise ValueError("distributed DP needs an integer secure round (secagg_integer = 1)")
        try:
            clip, gamma = float(config["secagg_clip_norm"]), float(config["secagg_dp_gamma"])  # type: ignore[arg-type]
            variance = float(config["secagg_dp_variance"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"distributed-DP masked step with missing or malformed parameters: {error}") from None
        if not (variance > 0 and gamma > 0 and clip > 0):
            raise ValueError(f"distributed DP: refusing clip {clip}, gamma {gamma}, noise variance {variance} "
                             "(each must be > 0: a client always adds its noise share)")
        if min_noise_multiplier is not None:
            planned = math.sqrt(protocol_config.n * variance) / (gamma * clip)
            if planned < min_noise_multiplier:
                raise ValueError(f"distributed DP: the server's noise, {planned:.3g} x the clip norm with all "
                                 f"{protocol_config.n} clients' shares, is below this client's minimum "
                                 f"{min_noise_multiplier:g}: refusing to take part")
        check_field(protocol_config.n, gamma, clip, variance, current.delta.size)
        return distributed_input(current.delta, clip_norm=clip, gamma=gamma, client_variance=variance,
                                 rng=os_entropy_rng())
