"""Randomness that protects someone: DP noise and DP client sampling.

Two sources share one small interface, ``source.generator(index, purpose)``, which returns an object
with numpy's ``random(size)`` and ``normal(loc, scale, size)``:

- :class:`OSEntropy` (the default, and the only one a deployment may use): every call keys a fresh
  ChaCha20 keystream (a CSPRNG, from the ``cryptography`` package) with 32 bytes of
  ``os.urandom``. Nobody can regenerate the noise, not even the operator who knows the run's seed.
- :class:`SimulationSeed`: ``numpy.random.default_rng([seed, index, purpose])``. REPRODUCIBLE,
  SIMULATION ONLY, NOT PRIVATE against anyone who knows the seed: they regenerate the noise and
  subtract it, or recompute who was sampled. Keyed by (index, purpose) rather than a hidden counter,
  so a resumed run draws exactly the noise the uninterrupted run would have drawn, never a repeat.

``index`` is the round (DP noise: the release number, which the accountant's step count tracks);
``purpose`` separates the streams of one round ("sampling", "update", "clip_count").
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

PURPOSES: dict[str, int] = {"update": 101, "clip_count": 102}  # "sampling" keeps the historic [seed, round]
_CHUNK = 1 << 20  # values per keystream chunk: bounds the temporaries at a few MiB


def secure_uniform(size: int) -> np.ndarray:
    """``size`` float64 uniforms in (0, 1] from a ChaCha20 keystream keyed by ``os.urandom(32)``.

    53 random bits per value (the float64 mantissa); 0 never occurs, so ``log`` is always finite.
    """
    return _ChaCha(os.urandom(32)).uniform(size)


def secure_normal(size: int, std: float = 1.0) -> np.ndarray:
    """``size`` float64 draws of N(0, std^2) from OS entropy through ChaCha20 and Box-Muller."""
    return _ChaCha(os.urandom(32)).normal(size, std)


class _ChaCha:
    """One ChaCha20 keystream; consumed 8 bytes per uniform, in chunks."""

    def __init__(self, key: bytes) -> None:
        nonce = bytes(16)  # a fresh random key per stream, so a fixed nonce (and counter 0) is safe
        self._encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def _words(self, n: int) -> np.ndarray:
        stream = self._encryptor.update(bytes(8 * n))  # ChaCha20 of zeros is the keystream itself
        return np.frombuffer(stream, dtype="<u8")

    def uniform(self, size: int) -> np.ndarray:
        out = np.empty(int(size), dtype=np.float64)
        for start in range(0, out.size, _CHUNK):
            part = out[start:start + _CHUNK]
            words = self._words(part.size)
            np.multiply((words >> np.uint64(11)) + np.uint64(1), 2.0**-53, out=part)
        return out

    def normal(self, size: int, std: float = 1.0) -> np.ndarray:
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        out = np.empty(int(size), dtype=np.float64)
        for start in range(0, out.size, _CHUNK):
            part = out[start:start + _CHUNK]
            half = (part.size + 1) // 2
            u = self.uniform(2 * half)
            radius = np.sqrt(-2.0 * np.log(u[:half]))  # Box-Muller: two normals per pair of uniforms
            angle = u[half:]
            angle *= 2.0 * math.pi
            first = part[:half]
            np.cos(angle, out=first)
            first *= radius
            second = part[half:]
            np.sin(angle[:second.size], out=second)
            second *= radius[:second.size]
        if std != 1.0:
            out *= std
        return out


class SecureRandom:
    """The numpy ``Generator`` methods DP code uses (``random``, ``normal``), from OS entropy + ChaCha20."""

    def __init__(self) -> None:
        self._stream = _ChaCha(os.urandom(32))

    def random(self, size: int | None = None) -> np.ndarray | float:
        values = self._stream.uniform(1 if size is None else size)
        values = 1.0 - values  # (0, 1] -> [0, 1), as numpy's random()
        return float(values[0]) if size is None else values

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        count = 1 if size is None else int(np.prod(size))
        values = self._stream.normal(count, float(scale))
        if loc:
            values += loc
        if size is None:
            return float(values[0])
        return values.reshape(size)


Generator = np.random.Generator | SecureRandom
"""What a source hands out: both offer ``random(size)`` and ``normal(loc, scale, size)``."""


class RandomnessSource(Protocol):
    reproducible: bool

    def generator(self, index: int, purpose: str) -> Generator: ...

    def describe(self) -> str: ...


class OSEntropy:
    """Fresh OS entropy through a ChaCha20 CSPRNG on every call: what a deployment must use."""

    reproducible = False

    def generator(self, index: int, purpose: str) -> SecureRandom:
        return SecureRandom()

    def describe(self) -> str:
        return "OS entropy (ChaCha20 keyed by os.urandom)"

    def __repr__(self) -> str:
        return "OSEntropy()"


class SimulationSeed:
    """REPRODUCIBLE, SIMULATION ONLY, NOT PRIVATE against anyone who knows the seed.

    ``generator(index, purpose)`` is ``default_rng([seed, index, code(purpose)])`` (for "sampling":
    ``default_rng([seed, index])``, the loop's historic stream): the same round and purpose always
    give the same draws, whatever happened before (a resumed run repeats nothing).
    """

    reproducible = True

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def generator(self, index: int, purpose: str) -> np.random.Generator:
        if purpose == "sampling":
            return np.random.default_rng([self.seed, index])
        if purpose not in PURPOSES:
            raise ValueError(f"unknown randomness purpose {purpose!r}; known: sampling, {', '.join(PURPOSES)}")
        return np.random.default_rng([self.seed, index, PURPOSES[purpose]])

    def describe(self) -> str:
        return (f"seed {self.seed} (reproducible, simulation only, not private against anyone who knows "
                f"the seed)")

    def __repr__(self) -> str:
        return f"SimulationSeed({self.seed})"
