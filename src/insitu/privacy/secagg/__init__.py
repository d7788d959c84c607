"""Secure aggregation (Bonawitz et al. 2017; SecAgg+ neighbour graphs of Bell et al. 2020 as an option).

The server learns the sum of the clients' fixed-point-encoded, clipped vectors and nothing else about
any single one, as long as fewer than t clients collude with it and clients do not drop out beyond what
t tolerates. Transport-agnostic: :class:`SecAggClient` / :class:`SecAggServer` exchange the plain
dataclasses of :mod:`~insitu.privacy.secagg.messages`; :func:`run_round` runs a round in-process.
"""

from insitu.privacy.secagg.encoding import MODULUS, FixedPoint, from_field, split_weighted, to_field, with_weight
from insitu.privacy.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    RevealedShare,
    RoutedShares,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    wire_size,
)
from insitu.privacy.secagg.protocol import (
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggRefused,
    SecAggServer,
)
from insitu.privacy.secagg.simulate import STAGES, RoundReport, run_round

__all__ = [
    "MODULUS",
    "STAGES",
    "AdvertiseKeys",
    "EncryptedShare",
    "FixedPoint",
    "KeyBroadcast",
    "MaskedInput",
    "RevealedShare",
    "RoundReport",
    "RoutedShares",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggRefused",
    "SecAggServer",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "from_field",
    "run_round",
    "split_weighted",
    "to_field",
    "wire_size",
    "with_weight",
]
