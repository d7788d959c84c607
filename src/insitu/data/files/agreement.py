"""The server and its clients agree on the class list: the server sends its list with every task, a client
whose own list differs refuses the task with an error saying how to fix it (instead of training on labels that
mean other classes)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from insitu.client.api import Client, Config, EvalResult, FitResult
from insitu.params import Parameters

#: The task config entry that carries the server's class names (a JSON list of strings).
CLASSES_KEY = "data_classes"


def encode_classes(classes: Sequence[str]) -> str:
    """The config value for ``classes`` (JSON, so names may hold commas)."""
    return json.dumps([str(c) for c in classes])


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
    """A client that checks the server's class list (if it sends one) before every fit and evaluate."""

    def __init__(self, inner: Client, classes: Sequence[str]) -> None:
        self.inner = inner
        self.classes = tuple(classes)

    def fit(self, parameters: Parameters, config: Config) -> FitResult:
        """The inner client's fit, once the class lists agree."""
        check_classes(config, self.classes)
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: Parameters, config: Config) -> EvalResult:
        """The inner client's evaluate, once the class lists agree."""
        check_classes(config, self.classes)
        return self.inner.evaluate(parameters, config)
