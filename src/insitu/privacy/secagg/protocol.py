"""Secure aggregation state machines (Bonawitz et al., CCS 2017), optionally on a SecAgg+ neighbour graph.

The server learns only the sum of the surviving clients' encoded inputs. Rounds, as in the paper:

0. AdvertiseKeys: each client sends two X25519 public keys; the server broadcasts them (U1).
1. ShareKeys: each client Shamir-shares (t of its group) its self-mask seed b_u and its mask secret
   key s_u, encrypts each recipient's share pair (AES-GCM, key from X25519(c_u, c_v)), the server
   routes the ciphertexts (U2 = senders).
2. MaskedInputCollection: y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) mod 2**32
   over neighbours v in U2 (U3 = senders of y).
3. Unmasking: each client reveals shares of b_v for v in U3 and of s_v for v in U2 \\ U3, never both
   for one v and only once; the server reconstructs, strips the masks and decodes the sum.

With ``degree=None`` every client's group is all n clients (the original protocol). With an even
``degree=k`` (SecAgg+, Bell et al., CCS 2020) client u shares and masks only with its k neighbours on a
public random ring (a Harary graph), and t counts shares within the group of k+1 (u and its
neighbours); per-client costs then grow with k instead of n. Semi-honest server model: no consistency
check round and no signatures (see docs).
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TypeGuard

import numpy as np

from insitu.errors import RoundAborted
from insitu.privacy.secagg import prg
from insitu.privacy.secagg.encoding import FixedPoint, from_field, to_field
from insitu.privacy.secagg.keys import (
    CIPHERTEXT_BYTES,
    KEY_BYTES,
    KeyPair,
    SharePair,
    decrypt_shares,
    derive,
    encrypt_shares,
    private_key_from_bytes,
)
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
)
from insitu.privacy.secagg.shamir import SHARE_BYTES, reconstruct_bytes, share_bytes

__all__ = ["SecAggAbort", "SecAggClient", "SecAggConfig", "SecAggError", "SecAggRefused", "SecAggServer"]

logger = logging.getLogger("insitu")

_MASK_PURPOSE = b"pairwise-mask"
_ENC_PURPOSE = b"share-encryption"


class SecAggError(Exception):
    """Base class of secure-aggregation protocol failures."""


class SecAggAbort(SecAggError, RoundAborted):
    """The round cannot finish (too few clients left); nothing about any individual input is revealed."""


class SecAggRefused(SecAggError, ValueError):
    """A client refuses a server request that could reveal its own or another client's input."""


@dataclass(frozen=True)
class SecAggConfig:
    """Public round parameters: n clients with ids 1..n, threshold t, vector length, clipping bound.

    With ``integer=True`` the inputs are already integers (distributed DP's noised, rounded vectors):
    they enter Z_R as they are (mod 2**32, no fixed-point scaling and no clipping to ``bound``) and the
    server reads the sum as a two's-complement 32-bit integer, so it must lie in [-2**31, 2**31)
    (choosing the scale for that is the input's owner's job, see :mod:`insitu.privacy.distributed`).
    """

    n: int
    t: int
    dim: int
    bound: float
    session: int = 0
    degree: int | None = None
    integer: bool = False

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got n={self.n}")
        if self.dim < 1:
            raise ValueError(f"vector length must be positive, got dim={self.dim}")
        if not 0 <= self.session < 2**64:
            raise ValueError("session must fit in 64 bits")
        if self.degree is not None and (self.degree < 2 or self.degree % 2 or self.degree >= self.n):
            raise ValueError(f"SecAgg+ degree must be even, >= 2 and < n={self.n}, got {self.degree}")
        size = self.group_size
        who = "clients" if self.degree is None else f"members of each client's group (degree {self.degree} + 1)"
        if self.t > size:
            raise ValueError(f"threshold t={self.t} exceeds the number of {who} ({size})")
        if self.t <= size / 2:
            raise ValueError(
                f"threshold t={self.t} must exceed half the {who} (n/2={size / 2:g}) "
                "or the server could unmask individual updates"
            )
        if not self.integer:
            FixedPoint.for_sum(self.n, self.bound)  # validate the bound early

    @property
    def group_size(self) -> int:
        """Clients that hold shares of one client's secrets: n, or degree + 1 under SecAgg+."""
        return self.n if self.degree is None else self.degree + 1

    @cached_property
    def fixed_point(self) -> FixedPoint:
        """The fixed-point codec for n summands clipped to [-bound, bound]."""
        return FixedPoint.for_sum(self.n, self.bound)

    @property
    def client_ids(self) -> range:
        """Valid client ids: 1..n (0 is not a valid Shamir evaluation point)."""
        return range(1, self.n + 1)

    @cached_property
    def _neighbours(self) -> dict[int, frozenset[int]]:
        """Neighbour sets: everyone else, or a Harary graph on a ring permuted by the session number."""
        ids = list(self.client_ids)
        if self.degree is None:
            everyone = frozenset(ids)
            return {u: everyone - {u} for u in ids}
        order = np.random.Generator(np.random.PCG64(self.session)).permutation(ids).tolist()
        half = self.degree // 2
        result: dict[int, frozenset[int]] = {}
        for pos, u in enumerate(order):
            result[u] = frozenset(order[(pos + d) % self.n] for d in range(-half, half + 1) if d)
        return result

    def neighbours(self, u: int) -> frozenset[int]:
        """Clients with whom u shares pairwise masks."""
        return self._neighbours[u]

    def group(self, u: int) -> frozenset[int]:
        """Clients holding shares of u's secrets: u and its neighbours."""
        return self._neighbours[u] | {u}


def _pair_context(session: int, u: int, v: int) -> bytes:
    """HKDF context of a pairwise key: symmetric in (u, v), so both ends derive the same key."""
    return struct.pack(">QII", session, min(u, v), max(u, v))


def _is_id(x: object) -> TypeGuard[int]:
    """Client ids are plain ints (not bools or floats that merely compare equal)."""
    return type(x) is int


def _valid_key(raw: object) -> bool:
    """A raw X25519 public key is exactly 32 bytes."""
    return isinstance(raw, bytes) and len(raw) == KEY_BYTES


class _Phase(enum.Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"
    ABORTED = "aborted"


class SecAggClient:
    """One client's side of a round; each method is one protocol step and may be called only once, in order."""

    def __init__(self, client_id: int, config: SecAggConfig) -> None:
        if not _is_id(client_id) or client_id not in config.client_ids:
            raise ValueError(f"client id {client_id} outside 1..{config.n}")
        self.id = client_id
        self.config = config
        self.n_clipped = 0
        self._phase = _Phase.NEW
        self._cipher_keys: KeyPair | None = None
        self._mask_keys: KeyPair | None = None
        self._seed: bytes | None = None
        self._u1: dict[int, AdvertiseKeys] = {}
        self._own_pair: SharePair | None = None
        self._received: dict[int, bytes] = {}
        self._u2: set[int] = set()

    def _expect(self, phase: _Phase, step: str) -> None:
        """Enforce step order; answering a step twice could leak both kinds of share."""
        if self._phase is not phase:
            raise SecAggRefused(f"client {self.id}: {step} not allowed in phase {self._phase.value}")

    def _refuse(self, reason: str) -> SecAggRefused:
        """Log and build a refusal; the client then stops taking part in this round."""
        self._phase = _Phase.ABORTED
        logger.warning("secagg client %d refuses: %s", self.id, reason)
        return SecAggRefused(f"client {self.id} refuses: {reason}")

    def _enc_key(self, v: int) -> bytes:
        """AES-GCM key shared with client v: HKDF(X25519(c_u, c_v))."""
        assert self._cipher_keys is not None
        context = _pair_context(self.config.session, self.id, v)
        return derive(self._cipher_keys.private, self._u1[v].cipher_public, _ENC_PURPOSE, context)

    def _mask_seed(self, v: int) -> bytes:
        """Pairwise mask seed s_uv shared with client v: HKDF(X25519(s_u, s_v))."""
        assert self._mask_keys is not None
        context = _pair_context(self.config.session, self.id, v)
        return derive(self._mask_keys.private, self._u1[v].mask_public, _MASK_PURPOSE, context)

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: fresh key pairs; send both public keys."""
        self._expect(_Phase.NEW, "advertise_keys")
        self._cipher_keys, self._mask_keys = KeyPair.generate(), KeyPair.generate()
        self._phase = _Phase.ADVERTISED
        return AdvertiseKeys(self.id, self._cipher_keys.public, self._mask_keys.public)

    def _check_broadcast(self, broadcast: KeyBroadcast) -> dict[int, AdvertiseKeys]:
        """Validate the server's key list: right session, known distinct ids and keys, ourselves included."""
        cfg = self.config
        if broadcast.session != cfg.session:
            raise self._refuse(f"key list is for session {broadcast.session}, not {cfg.session}")
        keys: dict[int, AdvertiseKeys] = {}
        for entry in broadcast.keys:
            if not _is_id(entry.client_id) or entry.client_id not in cfg.client_ids or entry.client_id in keys:
                raise self._refuse(f"key list names unknown or duplicate client {entry.client_id!r}")
            if not (_valid_key(entry.cipher_public) and _valid_key(entry.mask_public)):
                raise self._refuse(f"key list has malformed keys for client {entry.client_id}")
            keys[entry.client_id] = entry
        publics = [k for e in keys.values() for k in (e.cipher_public, e.mask_public)]
        if len(set(publics)) != len(publics):
            raise self._refuse("key list repeats a public key")
        mine = keys.get(self.id)
        assert self._cipher_keys and self._mask_keys
        if mine is None or (mine.cipher_public, mine.mask_public) != (self._cipher_keys.public, self._mask_keys.public):
            raise self._refuse("key list does not carry this client's own keys")
        live = cfg.group(self.id) & keys.keys()
        if len(live) < cfg.t:
            raise SecAggAbort(f"client {self.id}: only {len(live)} clients of its group advertised keys, need t={cfg.t}")
        return {v: keys[v] for v in live}

    def share_keys(self, broadcast: KeyBroadcast) -> ShareKeys:
        """Round 1: Shamir-share the self-mask seed and mask secret key over the group, encrypt per recipient."""
        self._expect(_Phase.ADVERTISED, "share_keys")
        self._u1 = self._check_broadcast(broadcast)
        assert self._cipher_keys and self._mask_keys
        cfg, points = self.config, sorted(self._u1)
        self._seed = os.urandom(prg.SEED_BYTES)
        seed_shares = share_bytes(self._seed, points, cfg.t)
        key_shares = share_bytes(self._mask_keys.secret_bytes(), points, cfg.t)
        out = []
        for v in points:
            pair = SharePair(key_shares[v], seed_shares[v])
            if v == self.id:
                self._own_pair = pair
                continue
            ciphertext = encrypt_shares(self._enc_key(v), cfg.session, self.id, v, pair)
            out.append(EncryptedShare(self.id, v, ciphertext))
        self._phase = _Phase.SHARED
        return ShareKeys(self.id, tuple(out))

    def _usable_shares(self, routed: RoutedShares, warn: bool) -> dict[int, bytes]:
        """The well-formed ciphertexts addressed to us by group members, by sender (the rest skipped)."""
        received: dict[int, bytes] = {}
        for item in routed.shares:
            reason = None
            if item.recipient != self.id:
                reason = f"addressed to {item.recipient!r}"
            elif not _is_id(item.sender) or item.sender not in self._u1 or item.sender == self.id:
                reason = f"from client {item.sender!r} outside this client's group"
            elif item.sender in received:
                reason = f"duplicate from client {item.sender}"
            elif not isinstance(item.ciphertext, bytes) or len(item.ciphertext) != CIPHERTEXT_BYTES:
                reason = f"malformed ciphertext from client {item.sender}"
            if reason:
                if warn:
                    logger.warning("secagg client %d ignores an encrypted share: %s", self.id, reason)
                continue
            received[item.sender] = item.ciphertext
        return received

    def sharers(self, routed: RoutedShares) -> frozenset[int]:
        """The participants this client can vouch for at the masked step: itself and the members of its
        group whose keys it holds and whose encrypted share reached it (what :meth:`masked_input` keeps).

        Under SecAgg+ (``degree``) this is at most degree + 1 clients, whatever n the server claims: the
        rest of the round is invisible to this client."""
        self._expect(_Phase.SHARED, "sharers")
        if routed.recipient != self.id:
            return frozenset({self.id})
        return frozenset(self._usable_shares(routed, warn=False)) | {self.id}

    def _accept_routed(self, routed: RoutedShares) -> None:
        """Keep well-formed ciphertexts addressed to us by group members; log and skip the rest."""
        if routed.recipient != self.id:
            raise self._refuse(f"routed shares are addressed to {routed.recipient!r}")
        self._received = self._usable_shares(routed, warn=True)
        self._u2 = set(self._received) | {self.id}

    def masked_input(self, routed: RoutedShares, x: np.ndarray) -> MaskedInput:
        """Round 2: store the routed shares, then send y_u = enc(x) + PRG(b_u) +- pairwise masks (mod 2**32)."""
        self._expect(_Phase.SHARED, "masked_input")
        cfg = self.config
        x = np.asarray(x)
        if x.shape != (cfg.dim,):
            raise ValueError(f"client {self.id}: input has shape {x.shape}, expected ({cfg.dim},)")
        self._accept_routed(routed)
        if len(self._u2) < cfg.t:
            self._phase = _Phase.ABORTED
            raise SecAggAbort(f"client {self.id}: only {len(self._u2)} clients of its group shared keys, need t={cfg.t}")
        if cfg.integer:
            if x.dtype.kind not in "iu":
                raise ValueError(f"client {self.id}: an integer round needs an integer input, got dtype {x.dtype}")
            y = to_field(x)
        else:
            y, self.n_clipped = cfg.fixed_point.encode(x)
        assert self._seed is not None and self._mask_keys is not None
        y += prg.expand(self._seed, cfg.dim)
        for v in sorted(self._u2 - {self.id}):
            mask = prg.expand(self._mask_seed(v), cfg.dim)
            if v > self.id:
                y += mask
            else:
                y -= mask
        self._phase = _Phase.MASKED
        return MaskedInput(self.id, y.astype("<u4", copy=False).tobytes())

    def _check_request(self, request: UnmaskRequest) -> tuple[set[int], set[int]]:
        """Refuse requests naming unknown clients, asking both kinds for one client, or below threshold."""
        cfg = self.config
        survivors, dropped = set(request.survivors), set(request.dropped)
        if request.session != cfg.session:
            raise self._refuse(f"unmask request is for session {request.session}, not {cfg.session}")
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise self._refuse("unmask request repeats a client")
        both = survivors & dropped
        if both:
            raise self._refuse(f"unmask request asks for both the self-mask and the mask key of clients {sorted(both)}")
        unknown = {c for c in survivors | dropped if not _is_id(c) or c not in cfg.client_ids}
        if unknown:
            raise self._refuse(f"unmask request names clients not in the protocol: {sorted(unknown)}")
        mine_s, mine_d = survivors & cfg.group(self.id), dropped & cfg.group(self.id)
        strangers = (mine_s | mine_d) - self._u2
        if strangers:
            raise self._refuse(f"unmask request names clients that never shared keys with this one: {sorted(strangers)}")
        if self.id not in survivors:
            raise self._refuse("unmask request does not list this client as a survivor")
        if len(mine_s) < cfg.t:
            raise self._refuse(f"only {len(mine_s)} survivors in this client's group, need t={cfg.t}")
        return mine_s, mine_d

    def _share_from(self, owner: int) -> SharePair | None:
        """Decrypt owner's share pair for us (our own is kept in the clear); None if it fails authentication."""
        if owner == self.id:
            return self._own_pair
        try:
            return decrypt_shares(self._enc_key(owner), self.config.session, owner, self.id, self._received[owner])
        except ValueError as exc:
            logger.warning("secagg client %d cannot use client %d's share: %s", self.id, owner, exc)
            return None

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3 (answered once): seed shares of survivors, key shares of dropped clients."""
        self._expect(_Phase.MASKED, "unmask")
        survivors, dropped = self._check_request(request)
        seeds, keys = [], []
        for owner in sorted(survivors):
            pair = self._share_from(owner)
            if pair is not None:
                seeds.append(RevealedShare(owner, pair.seed_share))
        for owner in sorted(dropped):
            pair = self._share_from(owner)
            if pair is not None:
                keys.append(RevealedShare(owner, pair.key_share))
        self._phase = _Phase.DONE
        return UnmaskResponse(self.id, tuple(seeds), tuple(keys))


class SecAggServer:
    """The server's side of a round: validates, routes, and unmasks only the aggregate."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self.excluded: dict[int, str] = {}
        """Clients excluded for malformed messages, with the reason (also logged)."""
        self.reconstructed: dict[int, str] = {}
        """Which secret was reconstructed per client ("seed" or "key"): never both; empty after an abort."""
        self.result: np.ndarray | None = None
        self.survivors: tuple[int, ...] = ()
        self._phase = _Phase.NEW
        self._u1: dict[int, AdvertiseKeys] = {}
        self._u2: set[int] = set()
        self._masked_from: set[int] = set()
        self._masked_sum: np.ndarray | None = None  # running sum mod 2**32: server memory O(D), not O(n D)

    def _exclude(self, client: object, reason: str) -> None:
        """Log and record why a client's message was dropped."""
        logger.warning("secagg server excludes client %r: %s", client, reason)
        if isinstance(client, int):
            self.excluded.setdefault(client, reason)

    def _abort(self, reason: str) -> SecAggAbort:
        """Forget every secret-bearing state, log, and build the abort error."""
        self._masked_from.clear()
        self._masked_sum = None
        self.reconstructed.clear()
        self.result = None
        self._phase = _Phase.ABORTED
        logger.error("secagg round %d aborted: %s", self.config.session, reason)
        return SecAggAbort(f"secure aggregation aborted: {reason}; no individual update was revealed")

    def _expect(self, phase: _Phase, step: str) -> None:
        """Enforce step order."""
        if self._phase is not phase:
            raise SecAggError(f"server: {step} not allowed in phase {self._phase.value}")

    def _need(self, count: int, what: str) -> None:
        """Abort unless at least t clients are left."""
        if count < self.config.t:
            raise self._abort(f"only {count} clients {what}, need t={self.config.t}")

    def collect_keys(self, messages: Iterable[AdvertiseKeys]) -> KeyBroadcast:
        """Round 0: accept well-formed, distinct public keys from known clients; broadcast them (U1)."""
        self._expect(_Phase.NEW, "collect_keys")
        seen_keys: set[bytes] = set()
        for msg in messages:
            cid = getattr(msg, "client_id", None)
            if not isinstance(msg, AdvertiseKeys) or not _is_id(cid) or cid not in self.config.client_ids:
                self._exclude(cid, "key advertisement from an unknown client")
            elif cid in self._u1 or cid in self.excluded:
                self._exclude(cid, "second key advertisement")
                self._u1.pop(cid, None)
            elif not (_valid_key(msg.cipher_public) and _valid_key(msg.mask_public)):
                self._exclude(cid, "public keys must be 32 raw bytes each")
            elif {msg.cipher_public, msg.mask_public} & seen_keys or msg.cipher_public == msg.mask_public:
                self._exclude(cid, "public key already used")
            else:
                seen_keys |= {msg.cipher_public, msg.mask_public}
                self._u1[cid] = msg
        self._need(len(self._u1), "advertised keys")
        self._phase = _Phase.ADVERTISED
        return KeyBroadcast(self.config.session, tuple(self._u1[c] for c in sorted(self._u1)))

    def _check_share_keys(self, msg: ShareKeys) -> str | None:
        """Why a ShareKeys message is unacceptable (None if fine): exactly one ciphertext per group member."""
        cid = msg.client_id
        expected = (self.config.group(cid) & self._u1.keys()) - {cid}
        recipients = [item.recipient for item in msg.shares]
        if any(not _is_id(r) for r in recipients):
            return "encrypted share with a malformed recipient id"
        if any(item.sender != cid for item in msg.shares):
            return "encrypted share claims another sender"
        strangers = set(recipients) - expected
        if strangers:
            return f"encrypted shares for clients not in the protocol: {sorted(strangers, key=repr)}"
        if len(recipients) != len(set(recipients)) or set(recipients) != expected:
            return "must send exactly one encrypted share to every other client of its group"
        if any(not isinstance(item.ciphertext, bytes) or len(item.ciphertext) != CIPHERTEXT_BYTES for item in msg.shares):
            return f"encrypted share of wrong length (expected {CIPHERTEXT_BYTES} bytes)"
        return None

    def route_shares(self, messages: Iterable[ShareKeys]) -> dict[int, RoutedShares]:
        """Round 1: validate each client's ciphertexts and route them to their recipients (U2 = senders)."""
        self._expect(_Phase.ADVERTISED, "route_shares")
        accepted: dict[int, ShareKeys] = {}
        for msg in messages:
            cid = getattr(msg, "client_id", None)
            if not isinstance(msg, ShareKeys) or not _is_id(cid) or cid not in self._u1 or cid in accepted:
                self._exclude(cid, "share message from a client not in U1, or a second one")
                if _is_id(cid):
                    accepted.pop(cid, None)  # a client that sends twice is out altogether
                continue
            try:
                reason = self._check_share_keys(msg)
            except (AttributeError, TypeError):
                reason = "malformed share message"
            if reason:
                self._exclude(cid, reason)
            else:
                accepted[cid] = msg
        self._u2 = set(accepted)
        self._need(len(self._u2), "sent their encrypted shares")
        inbox: dict[int, list[EncryptedShare]] = {u: [] for u in self._u2}
        for msg in accepted.values():
            for item in msg.shares:
                if item.recipient in inbox:
                    inbox[item.recipient].append(item)
        self._phase = _Phase.SHARED
        return {u: RoutedShares(u, tuple(items)) for u, items in inbox.items()}

    def collect_masked(self, messages: Iterable[MaskedInput]) -> UnmaskRequest:
        """Round 2: add up 4*D-byte masked vectors from U2 clients (U3) as they come; ask survivors to unmask.

        Only the running sum is kept, so a client's second masked vector is refused and logged (its first counts).
        """
        self._expect(_Phase.SHARED, "collect_masked")
        dim = self.config.dim
        total = np.zeros(dim, dtype=np.uint32)
        for msg in messages:
            cid = getattr(msg, "client_id", None)
            if not isinstance(msg, MaskedInput) or not _is_id(cid) or cid not in self._u2:
                self._exclude(cid, "masked input from a client not in U2")
            elif cid in self._masked_from:
                logger.warning("secagg server ignores a second masked input from client %d (its first counts)", cid)
            elif not isinstance(msg.masked, bytes):
                self._exclude(cid, f"masked vector must be bytes of little-endian uint32, got {type(msg.masked).__name__}")
            elif len(msg.masked) != 4 * dim:
                self._exclude(cid, f"masked vector has {len(msg.masked)} bytes, expected {4 * dim} (D={dim} uint32)")
            else:
                total += np.frombuffer(msg.masked, dtype="<u4")  # wraps mod 2**32
                self._masked_from.add(cid)
            del msg  # before the next one is fetched: one masked vector alive at a time
        self._masked_sum = total
        self._need(len(self._masked_from), "sent a valid masked input")
        self.survivors = tuple(sorted(self._masked_from))
        self._phase = _Phase.MASKED
        return UnmaskRequest(self.config.session, self.survivors, tuple(sorted(self._u2 - self._masked_from)))

    def _check_response(self, msg: UnmaskResponse, dropped: set[int]) -> str | None:
        """Why an unmask response is unacceptable (None if fine)."""
        group = self.config.group(msg.client_id)
        for kind, items, allowed in (("seed", msg.seed_shares, set(self.survivors)), ("key", msg.key_shares, dropped)):
            owners = [item.owner for item in items]
            if len(owners) != len(set(owners)):
                return f"repeats a {kind} share"
            bad = {o for o in owners if not _is_id(o) or o not in allowed & group}
            if bad:
                return f"{kind} shares for clients that do not exist or were not asked for: {sorted(bad, key=repr)}"
            if any(not isinstance(item.share, bytes) or len(item.share) != SHARE_BYTES for item in items):
                return f"{kind} share of wrong length (expected {SHARE_BYTES} bytes)"
        return None

    def _gather(self, messages: Iterable[UnmaskResponse], dropped: set[int]) -> tuple[dict, dict]:
        """Validate responses; return {owner: {x: share}} for self-mask seeds and for mask keys."""
        seeds: dict[int, dict[int, bytes]] = {u: {} for u in self.survivors}
        keys: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
        answered: set[int] = set()
        for msg in messages:
            cid = getattr(msg, "client_id", None)
            if not isinstance(msg, UnmaskResponse) or not _is_id(cid) or cid not in self.survivors or cid in answered:
                self._exclude(cid, "unmask response from a client not in U3, or a second one")
                continue
            try:
                reason = self._check_response(msg, dropped)
            except (AttributeError, TypeError):
                reason = "malformed unmask response"
            if reason:
                self._exclude(cid, reason)
                continue
            answered.add(cid)
            for item in msg.seed_shares:
                seeds[item.owner][cid] = item.share
            for item in msg.key_shares:
                keys[item.owner][cid] = item.share
        self._need(len(answered), "answered the unmask request")
        for kind, table in (("self-mask", seeds), ("mask-key", keys)):
            short = {owner: len(s) for owner, s in table.items() if len(s) < self.config.t}
            if short:
                raise self._abort(f"too few {kind} shares (owner: count) {short}")
        return seeds, keys

    def unmask(self, messages: Iterable[UnmaskResponse]) -> np.ndarray:
        """Round 3: reconstruct survivors' seeds and dropped clients' keys, remove all masks, decode the sum."""
        self._expect(_Phase.MASKED, "unmask")
        cfg = self.config
        dropped = self._u2 - set(self.survivors)
        seeds, keys = self._gather(messages, dropped)
        assert self._masked_sum is not None
        total, self._masked_sum = self._masked_sum, None  # unmasked in place
        try:
            for u, shares in seeds.items():
                total -= prg.expand(reconstruct_bytes(shares, prg.SEED_BYTES), cfg.dim)
                self.reconstructed[u] = "seed"
            for v, shares in keys.items():
                total = self._remove_pairwise(total, v, reconstruct_bytes(shares, KEY_BYTES))
                self.reconstructed[v] = "key"
        except ValueError as exc:
            raise self._abort(f"inconsistent shares: {exc}") from exc
        self.result = from_field(total) if cfg.integer else cfg.fixed_point.decode_sum(total)
        self._masked_sum = None
        self._phase = _Phase.DONE
        return self.result

    def _remove_pairwise(self, total: np.ndarray, v: int, secret: bytes) -> np.ndarray:
        """Undo the masks survivors u added for dropped client v, using v's reconstructed mask secret key."""
        cfg = self.config
        private = private_key_from_bytes(secret)
        if private.public_key().public_bytes_raw() != self._u1[v].mask_public:
            raise ValueError(f"reconstructed mask key of client {v} does not match its advertised public key")
        for u in sorted(cfg.neighbours(v) & set(self.survivors)):
            seed = derive(private, self._u1[u].mask_public, _MASK_PURPOSE, _pair_context(cfg.session, u, v))
            if v > u:
                total -= prg.expand(seed, cfg.dim)
            else:
                total += prg.expand(seed, cfg.dim)
        return total
