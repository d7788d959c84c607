"""Parameters: the named, ordered arrays a federation exchanges.

Aggregators work on one flat float32 vector; only the edges (clients, model I/O) know about
``nn.Module``. Each array keeps its own dtype and shape, so a round trip through a module is exact
(integer buffers such as BatchNorm's ``num_batches_tracked`` included).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """Name, shape and dtype of one array: what a peer must send back for the same slot."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Parameters:
    """An ordered list of named numpy arrays with a flat float32 view.

    Build one with :meth:`from_module`, :meth:`from_state_dict`, :meth:`from_arrays` or
    :meth:`from_flat`; write it back with :meth:`to_module`. A Parameters value is treated as
    immutable: its flat view is computed once (or is the very buffer the arrays live in) and shared,
    so neither the arrays nor ``flat()`` may be modified in place.
    """

    __slots__ = ("__weakref__", "_arrays", "_flat", "_names", "_specs")

    def __init__(self, names: Sequence[str], arrays: Sequence[np.ndarray], _flat: np.ndarray | None = None) -> None:
        if len(names) != len(arrays):
            raise ValueError(f"Parameters: {len(names)} names but {len(arrays)} arrays")
        if len(set(names)) != len(names):
            raise ValueError("Parameters: names must be unique")
        self._names = tuple(names)
        self._arrays = tuple(np.asarray(a) for a in arrays)
        self._flat = _flat
        self._specs: tuple[ParamSpec, ...] | None = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> Parameters:
        """Copy a torch state_dict (parameters and buffers) into numpy arrays."""
        names = list(state.keys())
        tensors = [t.detach() for t in state.values()]
        if all(t.dtype == torch.float32 for t in tensors):
            # One copy into one buffer; the arrays are views of it, so flat() costs nothing.
            flat = np.empty(sum(t.numel() for t in tensors), dtype=np.float32)
            arrays, offset = [], 0
            for t in tensors:
                view = flat[offset : offset + t.numel()].reshape(tuple(t.shape))
                torch.from_numpy(view).copy_(t)
                arrays.append(view)
                offset += t.numel()
            return cls(names, arrays, _flat=flat)
        return cls(names, [t.cpu().numpy().copy() for t in tensors])

    @classmethod
    def from_module(cls, module: nn.Module, *, share: bool = False) -> Parameters:
        """Snapshot every parameter and buffer of ``module`` (its full state_dict).

        ``share=True`` (flattened modules only) skips the copy: the result views the module's
        memory until insitu next loads parameters into the module, at which point a result that is
        still referenced gets its own copy. For engines that fold each result before the next
        client runs (the in-process simulation), so the usual case costs no copy at all.
        """
        flat = _flat_storage(module)
        if flat is not None:  # a flattened module: the whole state is one copy
            specs = _flat_specs(module)
            if share:
                _release_lease(module)
                shared = cls.from_flat(flat.detach().numpy(), specs, copy=False)
                object.__setattr__(module, "_insitu_lease", weakref.ref(shared))
                return shared
            return cls.from_flat(flat.detach().numpy(), specs, copy=True)
        return cls.from_state_dict(module.state_dict())

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> Parameters:
        """From a name->array mapping, or a plain list (named ``"0"``, ``"1"``, ...).

        Several float32 arrays are copied into one buffer (so ``flat()`` never needs another copy).
        """
        if isinstance(arrays, Mapping):
            names, values = list(arrays.keys()), [np.asarray(a) for a in arrays.values()]
        else:
            names, values = [str(i) for i in range(len(arrays))], [np.asarray(a) for a in arrays]
        if len(values) > 1 and all(a.dtype == np.float32 for a in values):
            flat = np.concatenate([a.reshape(-1) for a in values])
            specs = [ParamSpec(n, tuple(a.shape), np.dtype(np.float32)) for n, a in zip(names, values)]
            return cls.from_flat(flat, specs, copy=False)
        return cls(names, values)

    @classmethod
    def from_flat(cls, vector: np.ndarray | torch.Tensor, specs: Sequence[ParamSpec], *, copy: bool = True) -> Parameters:
        """Cut a flat vector back into arrays of ``specs``' shapes, cast to their dtypes.

        With ``copy=False`` an all-float32 result shares ``vector``'s memory (hand it over).
        """
        if isinstance(vector, torch.Tensor):
            vector = vector.detach().cpu().numpy()
        vector = np.asarray(vector).reshape(-1)
        sizes = [s.size for s in specs]
        if vector.size != sum(sizes):
            raise ValueError(f"flat vector has {vector.size} values, specs need {sum(sizes)}")
        if all(s.dtype == np.float32 for s in specs):
            flat = vector.astype(np.float32, copy=copy)
            views, offset = [], 0
            for spec, size in zip(specs, sizes):
                views.append(flat[offset : offset + size].reshape(spec.shape))
                offset += size
            made = cls([s.name for s in specs], views, _flat=flat)
            if all(isinstance(s, ParamSpec) and isinstance(s.dtype, np.dtype) and isinstance(s.shape, tuple) for s in specs):
                made._specs = tuple(specs)  # already canonical: no need to rebuild them on demand
            return made
        arrays, offset = [], 0
        for spec in specs:
            chunk = vector[offset : offset + spec.size].reshape(spec.shape)
            if np.issubdtype(spec.dtype, np.integer):
                chunk = np.rint(chunk)
            arrays.append(chunk.astype(spec.dtype, copy=True))
            offset += spec.size
        return cls([s.name for s in specs], arrays)

    # -- views -----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self._arrays

    @property
    def specs(self) -> tuple[ParamSpec, ...]:
        if self._specs is None:
            self._specs = tuple(ParamSpec(n, tuple(a.shape), a.dtype) for n, a in zip(self._names, self._arrays))
        return self._specs

    @property
    def num_values(self) -> int:
        return sum(int(a.size) for a in self._arrays)

    def flat(self) -> np.ndarray:
        """All arrays as one float32 vector (the aggregators' currency). Shared: do not modify."""
        if self._flat is None and len(self._arrays) == 1 and self._arrays[0].dtype == np.float32:
            self._flat = self._arrays[0].reshape(-1)  # a view when contiguous: no model-sized copy
        if self._flat is None:
            out = np.empty(self.num_values, dtype=np.float32)
            offset = 0
            for a in self._arrays:
                out[offset : offset + a.size] = a.reshape(-1)
                offset += a.size
            self._flat = out
        return self._flat

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """Fresh tensors (one copy), usable with ``load_state_dict`` or ``torch.save``."""
        return {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(self._names, self._arrays)}

    def to_module(self, module: nn.Module) -> None:
        """Copy values into ``module`` in place; names, shapes and dtypes must match exactly."""
        _release_lease(module)
        flat = _flat_storage(module)
        if flat is not None and self._flat is not None and self.specs == _flat_specs(module):
            with torch.no_grad():
                flat.copy_(torch.from_numpy(self._flat))
            return
        state = module.state_dict()
        expected = [ParamSpec(k, tuple(v.shape), _np_dtype(v.dtype)) for k, v in state.items()]
        problem = describe_mismatch(self.specs, expected)
        if problem:
            raise IncompatibleParametersError(f"cannot load into {type(module).__name__}: {problem}")
        with torch.no_grad():
            for name, array in zip(self._names, self._arrays):
                state[name].copy_(torch.from_numpy(array))

    def _detach(self) -> None:
        """Take a private copy of the shared buffer this value views (see ``from_module(share=True)``)."""
        assert self._flat is not None
        flat = self._flat.copy()
        views, offset = [], 0
        for array in self._arrays:
            views.append(flat[offset : offset + array.size].reshape(array.shape))
            offset += array.size
        self._flat, self._arrays = flat, tuple(views)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(zip(self._names, self._arrays))

    def __len__(self) -> int:
        return len(self._arrays)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Parameters):
            return NotImplemented
        return self.specs == other.specs and all(np.array_equal(a, b) for a, b in zip(self._arrays, other._arrays))

    def __repr__(self) -> str:
        return f"Parameters({len(self)} arrays, {self.num_values} values)"


def flatten_module_(module: nn.Module) -> bool:
    """Re-seat every parameter and buffer of ``module`` as a view into one contiguous float32 tensor.

    Loading and snapshotting parameters then cost one copy each instead of one per tensor, which
    matters when one model serves many small virtual clients. The module behaves as before (same
    Parameter objects, so optimizers keep working). Returns False, changing nothing, for modules
    with non-float32 state, tensors shared under two names, or state_dict entries that are not
    plain parameters or buffers.
    """
    state = module.state_dict(keep_vars=True)
    tensors = list(state.values())
    if not tensors or any(t.dtype != torch.float32 for t in tensors) or len({id(t) for t in tensors}) != len(tensors):
        return False
    slots = _state_slots(module, state)
    if slots is None:
        return False
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=tensors[0].device)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            view = flat[offset : offset + t.numel()].view_as(t)
            view.copy_(t)
            t.data = view
            offset += t.numel()
    object.__setattr__(module, "_insitu_flat", flat)
    object.__setattr__(module, "_insitu_specs", tuple(ParamSpec(k, tuple(v.shape), np.dtype(np.float32)) for k, v in state.items()))
    object.__setattr__(module, "_insitu_slots", tuple((table, key, t.data_ptr()) for (table, key), t in zip(slots, tensors)))
    links = [(parent._modules, name, child) for parent in module.modules() for name, child in parent._modules.items()]
    object.__setattr__(module, "_insitu_links", tuple(links))
    return True


def _state_slots(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[tuple[dict, str]] | None:
    """For each state_dict entry, the (``_parameters`` or ``_buffers`` dict, key) holding it; None
    if an entry comes from elsewhere (a custom ``state_dict`` hook or extra state)."""
    slots = []
    for name, tensor in state.items():
        prefix, _, key = name.rpartition(".")
        try:
            owner = module.get_submodule(prefix) if prefix else module
        except AttributeError:
            return None
        table = owner._parameters if key in owner._parameters else owner._buffers
        if table.get(key) is not tensor:
            return None
        slots.append((table, key))
    return slots


def _release_lease(module: nn.Module) -> None:
    """Before the module's memory changes: a shared snapshot still in use gets its own copy."""
    ref = getattr(module, "_insitu_lease", None)
    if ref is not None:
        leased = ref()
        if leased is not None:
            leased._detach()
        object.__setattr__(module, "_insitu_lease", None)


def _flat_storage(module: nn.Module) -> torch.Tensor | None:
    """The module's flat state tensor if it was flattened and every tensor still lives in it."""
    flat = getattr(module, "_insitu_flat", None)
    if flat is None or flat.device.type != "cpu":
        return None
    # flatten_module_'s records, typed (see _flat_specs)
    links: tuple[tuple[dict[str, nn.Module | None], str, nn.Module], ...] = vars(module)["_insitu_links"]
    for children, name, child in links:
        if children.get(name) is not child:
            return None  # a submodule was replaced
    slots: tuple[tuple[dict[str, torch.Tensor | None], str, int], ...] = vars(module)["_insitu_slots"]
    for table, key, pointer in slots:
        tensor = table.get(key)
        if tensor is None or tensor.data_ptr() != pointer:
            return None  # something re-created or removed a tensor: fall back to the per-tensor path
    return flat


def _flat_specs(module: nn.Module) -> tuple[ParamSpec, ...]:
    """The specs :func:`flatten_module_` recorded (only for a module :func:`_flat_storage` accepts).

    flatten_module_ stores its records with ``object.__setattr__``, so they live in the instance
    ``__dict__``; read from there they keep their declared types (to a type checker, any other
    attribute of a Module is ``nn.Module.__getattr__``'s ``Tensor | Module``).
    """
    specs: tuple[ParamSpec, ...] = vars(module)["_insitu_specs"]
    return specs


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


class IncompatibleParametersError(ValueError):
    """A set of arrays does not match the expected names, shapes or dtypes."""


def describe_mismatch(got: Sequence[ParamSpec], expected: Sequence[ParamSpec]) -> str | None:
    """Say in words how ``got`` differs from ``expected`` (first difference), or None if equal."""
    if len(got) != len(expected):
        return f"{len(got)} arrays where {len(expected)} were expected"
    for g, e in zip(got, expected):
        if g.name != e.name:
            return f"array named {g.name!r} where {e.name!r} was expected"
        if g.shape != e.shape:
            return f"array {e.name!r} has shape {g.shape}, expected {e.shape}"
        if np.dtype(g.dtype) != np.dtype(e.dtype):
            return f"array {e.name!r} has dtype {np.dtype(g.dtype)}, expected {np.dtype(e.dtype)}"
    return None
