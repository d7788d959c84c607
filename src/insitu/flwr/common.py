"""``fl.common`` for Flower code run with insitu: the array types, the conversions of Flower's
``Parameters`` (here insitu's :class:`~insitu.params.Parameters`, arrays named "0", "1", ...), and the
``Context`` a ``client_fn(context)`` receives in ``insitu.simulate``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from insitu.flower.adapter import Context
from insitu.params import Parameters

__all__ = ["Context", "NDArray", "NDArrays", "Parameters", "Scalar", "ndarrays_to_parameters", "parameters_to_ndarrays"]

NDArray = np.ndarray
NDArrays = list[np.ndarray]
Scalar = bool | bytes | float | int | str


def ndarrays_to_parameters(ndarrays: Sequence[np.ndarray]) -> Parameters:
    """A list of arrays as insitu Parameters named by position (pass it as ``initial_parameters``)."""
    return Parameters.from_arrays([np.array(a, copy=True) for a in ndarrays])


def parameters_to_ndarrays(parameters: Parameters) -> NDArrays:
    """insitu Parameters as Flower's list of arrays, in order (copies)."""
    return [np.array(a, copy=True) for a in parameters.arrays]
