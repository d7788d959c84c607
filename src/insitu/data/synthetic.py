"""LEAF's synthetic(alpha, beta) federated dataset (Li et al. 2020, FedProx, Section 5.1), made lazily.

Client k has its own model and feature distribution:

* ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` (60 x 10), ``b_k ~ N(u_k, 1)`` (10): alpha sets how much the
  clients' labelling functions differ;
* ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (60), ``x ~ N(v_k, Sigma)`` with ``Sigma_jj = j^-1.2``: beta
  sets how much their inputs differ;
* ``y = argmax(softmax(W_k^T x + b_k))``; the number of examples is ``floor(LogNormal(4, 2)) + 50`` (a
  heavy tail), capped at ``max_examples``.

As in the FedProx reference code the second parameter of ``N(0, alpha)`` and ``N(0, beta)`` is the
standard deviation. Note what the definition implies: u_k is the mean of every entry of W_k and b_k, so
it adds u_k (sum(x) + 1) to all of a client's logits alike and leaves the argmax unchanged; with the
same seed the labels are the same for any alpha (heterogeneity comes from W_k's own N(0, 1) noise and
from beta). Each client also holds ``max(1, n // 9)`` held-out examples (a 90/10 split).

Nothing is stored per client: a client's data is generated on demand from a numpy Generator keyed by
``SeedSequence([seed, TAG, client])``, so a million clients cost no memory until one is drawn, and a
client's data is bit-identical every time it is drawn (whatever was drawn before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

from insitu.data.datasets import TensorDataset

__all__ = ["NUM_CLASSES", "NUM_FEATURES", "LazyParts", "SyntheticFederation"]

NUM_FEATURES = 60
NUM_CLASSES = 10
_TAG = 0x5E7  # keeps these streams apart from any other use of SeedSequence([seed, ...])
_TEST_TAG = 0x7E57  # the central test set's choice of clients


@dataclass(frozen=True)
class SyntheticFederation:
    """``num_clients`` clients of synthetic(alpha, beta), each generated from ``(seed, client)`` when asked."""

    num_clients: int
    alpha: float = 1.0
    beta: float = 1.0
    seed: int = 0
    max_examples: int = 1000  # 0 = the uncapped LogNormal(4, 2) tail (a client may then hold millions)
    num_features: int = NUM_FEATURES
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        if isinstance(self.num_clients, bool) or self.num_clients < 1:
            raise ValueError(f"synthetic dataset: num_clients must be >= 1, got {self.num_clients!r}")
        if not (self.alpha >= 0 and self.beta >= 0):
            raise ValueError(f"synthetic dataset: alpha and beta must be >= 0 (standard deviations), got "
                             f"alpha={self.alpha}, beta={self.beta}")
        if self.max_examples != 0 and self.max_examples < 50:
            raise ValueError(f"synthetic dataset: max_examples must be >= 50 (every client has at least 50 "
                             f"examples) or 0 for no cap, got {self.max_examples}")
        if self.num_features < 1 or self.num_classes < 2:
            raise ValueError("synthetic dataset: needs num_features >= 1 and num_classes >= 2")

    # -- one client ------------------------------------------------------------------------
    def _generator(self, client: int) -> np.random.Generator:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"synthetic client {client} is out of range: ids are 0 .. {self.num_clients - 1}")
        return np.random.default_rng(np.random.SeedSequence([self.seed, _TAG, int(client)]))

    def _size(self, rng: np.random.Generator) -> int:
        """The first draw of a client's stream: its number of training examples."""
        raw = rng.lognormal(4.0, 2.0)
        size = int(min(raw, 2.0**62)) + 50  # int() floors, as LEAF's astype(int)
        return min(size, self.max_examples) if self.max_examples else size

    def client_size(self, client: int) -> int:
        """How many training examples ``client`` has (cheap: one draw, no data generated)."""
        return self._size(self._generator(client))

    def client_arrays(self, client: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_train, y_train, x_test, y_test)`` of ``client``: float32 inputs, int64 labels."""
        rng = self._generator(client)
        n = self._size(rng)
        d, c = self.num_features, self.num_classes
        u = rng.normal(0.0, self.alpha)  # the model's mean: W and b share it
        b_mean = rng.normal(0.0, self.beta)
        v = rng.normal(b_mean, 1.0, d)
        weights = rng.normal(u, 1.0, (d, c))
        bias = rng.normal(u, 1.0, c)
        std = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2): Sigma is diagonal
        n_test = max(1, n // 9)
        x = v + rng.standard_normal((n + n_test, d)) * std
        y = np.argmax(x @ weights + bias, axis=1)  # softmax is monotone: its argmax is the logits'
        x32 = x.astype(np.float32)
        return x32[:n], y[:n].astype(np.int64), x32[n:], y[n:].astype(np.int64)

    def client_data(self, client: int) -> tuple[TensorDataset, TensorDataset]:
        """``client``'s training and held-out examples as datasets (generated now, not kept)."""
        x, y, xt, yt = self.client_arrays(client)
        return self._dataset(x, y), self._dataset(xt, yt)

    # -- the central test set --------------------------------------------------------------
    def test_clients(self, count: int) -> list[int]:
        """A fixed (by ``seed``) sample of ``count`` clients, at most all of them, in increasing order."""
        count = min(count, self.num_clients)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _TEST_TAG]))
        return sorted(int(i) for i in rng.choice(self.num_clients, size=count, replace=False))  # O(count)

    def test_set(self, num_clients: int = 100) -> TensorDataset:
        """The held-out examples of ``test_clients(num_clients)``, pooled: a bounded central test set
        (at most ``num_clients x max_examples / 9`` examples) from the same clients' distributions."""
        if num_clients < 1:
            raise ValueError(f"synthetic dataset: the test set needs >= 1 client, got {num_clients}")
        parts = [self.client_arrays(k)[2:] for k in self.test_clients(num_clients)]
        return self._dataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def _dataset(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)),
                             self.num_classes, "synthetic")


class LazyParts(Sequence[np.ndarray]):
    """``train_parts`` of a generated dataset: part k is ``arange(size of client k)`` (rows of the client's
    own data), computed when indexed, never held for every client."""

    def __init__(self, federation: SyntheticFederation) -> None:
        self._federation = federation

    def __len__(self) -> int:
        return self._federation.num_clients

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"client {index} is out of range: ids are 0 .. {n - 1}")
        return np.arange(self._federation.client_size(index % n), dtype=np.int64)

