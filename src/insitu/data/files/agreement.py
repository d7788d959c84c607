"""The server and its clients agree on the data: the server sends its class list and input shape with every task;
a client whose own differ refuses the task with an error saying how to fix it (instead of training on labels that
mean other classes, or failing on a parameter shape it cannot explain)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from insitu.client.api import Client, Config, EvalResult, FitResult
from insitu.params import Parameters

#: The task config entry that carries the server's class names (a JSON list of strings).
CLASSES_KEY = "data_classes"
#: The task config entry that carries the server's input shape, one example's (a JSON list of ints).
SHAPE_KEY = "data_input_shape"


def encode_classes(classes: Sequence[str]) -> str:
    """The config value for ``classes`` (JSON, so names may hold commas)."""
    return json.dumps([str(c) for c in classes])


def agreement_config(classes: Sequence[str], input_shape: Sequence[int]) -> dict[str, str]:
    """The entries a server adds to every task so its clients can check their data against its own."""
    return {CLASSES_KEY: encode_classes(classes), SHAPE_KEY: json.dumps([int(d) for d in input_shape])}


def check_shape(config: Config, mine: Sequence[int]) -> None:
    """Refuse a task whose server's examples have another shape than this client's."""
    value = config.get(SHAPE_KEY)
    if value is None:
        return
    try:
        theirs = [int(d) for d in json.loads(str(value))]
    except (json.JSONDecodeError, TypeError, ValueError):
        raise ValueError(f"the server sent a malformed input shape in {SHAPE_KEY!r}") from None
    if theirs != [int(d) for d in mine]:
        shape = "x".join(map(str, mine))
        hint = ("pass the server's --image-size and --image-mode (grayscale: 1 channel, rgb: 3)" if len(theirs) == 3
                else "use the same feature columns as the server (--feature-columns / --exclude-columns)")
        raise ValueError(f"this client's examples have shape {shape} but the server's have "
                         f"{'x'.join(map(str, theirs))}: {hint}")


def check_classes(config: Config, mine: Sequence[str]) -> None:
    """Refuse a task whose server lists other classes (or another order) than this client's data."""
    value = config.get(CLASSES_KEY)
    if value is None:
        return
    try:
        theirs = json.loads(str(value))
    except json.JSONDecodeError:
        raise ValueError(f"the server sent a malformed class list in {CLASSES_KEY!r}") from None
    if not isinstance(theirs, list) or not all(isinstance(c, str) for c in theirs):
        raise ValueError(f"the server's {CLASSES_KEY!r} must be a list of class names")
    if list(theirs) != list(mine):
        missing = [c for c in theirs if c not in mine]
        extra = [c for c in mine if c not in theirs]
        detail = "; ".join(part for part in (f"missing here: {', '.join(missing)}" if missing else "",
                                             f"not on the server: {', '.join(extra)}" if extra else "",
                                             "same names in another order" if not missing and not extra else "")
                           if part)
        raise ValueError(f"this client's classes ({', '.join(mine)}) differ from the server's ({', '.join(theirs)}): "
                         f"{detail}. Pass --classes {','.join(theirs)} so label i means the same class everywhere "
                         "(a client may hold no examples of some classes), or fix the class folders / labels")


class ClassCheckedClient:
    """A client that checks the server's class list and input shape (those it sends) before every task."""

    def __init__(self, inner: Client, classes: Sequence[str], input_shape: Sequence[int] | None = None) -> None:
        self.inner = inner
        self.classes = tuple(classes)
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def _check(self, config: Config) -> None:
        check_classes(config, self.classes)
        if self.input_shape is not None:
            check_shape(config, self.input_shape)

    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        """The inner client's fit, once the data agrees with the server's."""
        self._check(config)
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        """The inner client's evaluate, once the data agrees with the server's."""
        self._check(config)
        return self.inner.evaluate(parameters, config)
