"""Progress output for long runs: a bar over client updates and one line per round."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from insitu.engines.base import Engine, Task, TaskKind, TaskResult
from insitu.params import Parameters
from insitu.run.history import RoundRecord


def format_round(record: RoundRecord, num_rounds: int, show_clock: bool = False, show_epsilon: bool = True) -> str:
    """``Round 3/5  loss 0.081  accuracy 97.4%  (10 clients, 1.2 s)``, or why the round failed.

    ``show_clock`` adds the engine's clock (simulated seconds under a systems model) and, for FedBuff's
    server steps, the buffer's mean staleness. ``show_epsilon``: the run accounts privacy, so a fit metric named
    ``epsilon`` is an accountant's (without DP it could only be what a client chose to report)."""
    head = f"Round {record.round}/{num_rounds}"
    seconds = record.timings.get("total_s", 0.0)
    if record.status != "ok":
        return f"{head}  FAILED  {record.error}"
    parts = [head]
    if record.loss is not None:
        parts.append(f"loss {record.loss:.3f}")
    if record.accuracy is not None:
        parts.append(f"accuracy {100 * record.accuracy:.1f}%")
    if show_epsilon and "epsilon" in record.fit_metrics:
        parts.append(f"epsilon {record.fit_metrics['epsilon']:.2f}")
    if show_clock and "clock_s" in record.timings:
        parts.append(f"clock {record.timings['clock_s']:.1f} s")
    if "staleness_mean" in record.fit_metrics:
        parts.append(f"staleness {record.fit_metrics['staleness_mean']:.1f}")
    asr = record.centralized.metrics.get("attack_success_rate") if record.centralized else None
    if asr is not None:
        parts.append(f"backdoor success {100 * asr:.1f}%")
    if record.withheld:  # central DP: who and how many took part is not recorded (not covered by epsilon)
        parts.append("(client details withheld under DP)")
        return "  ".join(parts)
    rejected = f", {len(record.failures)} rejected" if record.failures else ""
    parts.append(f"({record.num_results} clients{rejected}, {seconds:.1f} s)")
    return "  ".join(parts)


class RoundPrinter:
    """Prints each finished round above the progress bar."""

    def __init__(self, console: Console, num_rounds: int, show_clock: bool = False, show_epsilon: bool = True) -> None:
        self.console = console
        self.num_rounds = num_rounds
        self.show_clock = show_clock
        self.show_epsilon = show_epsilon

    def __call__(self, record: RoundRecord) -> None:
        style = "" if record.status == "ok" else "bold red"
        self.console.print(format_round(record, self.num_rounds, self.show_clock, self.show_epsilon), style=style, highlight=False)


class _CountingEngine:
    """Delegates to an engine and advances the bar once per fit result."""

    def __init__(self, engine: Engine, progress: Progress, task_id: TaskID) -> None:
        self._engine, self._progress, self._task_id = engine, progress, task_id

    def wait_for(self, num_clients: int, timeout: float | None) -> Sequence[str]:
        return self._engine.wait_for(num_clients, timeout)

    def submit(self, kind: TaskKind, parameters: Parameters, model_version: int, tasks: Sequence[Task]) -> list[int]:
        return self._engine.submit(kind, parameters, model_version, tasks)

    def results(self) -> Iterator[TaskResult]:
        for result in self._engine.results():
            if result.kind == "fit":
                self._progress.advance(self._task_id)
            yield result
            del result  # hold no update while the next one is fetched

    def outstanding(self) -> int:
        return self._engine.outstanding()

    def clock(self) -> float:
        return self._engine.clock()

    def close(self) -> None:
        self._engine.close()


class _Bar:
    def __init__(self, progress: Progress, task_id: TaskID) -> None:
        self.progress, self.task_id = progress, task_id

    def wrap(self, engine: Engine) -> Engine:
        return _CountingEngine(engine, self.progress, self.task_id)


@contextmanager
def progress_bar(console: Console, total: int) -> Iterator[_Bar]:
    """A bar counting client updates over the whole run (hidden when output is not a terminal)."""
    progress = Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("client updates"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )
    with progress:
        yield _Bar(progress, progress.add_task("training", total=total))
