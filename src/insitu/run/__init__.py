"""The round loop (coordinator) and its history."""

from insitu.run.history import Evaluation, History, RoundRecord
from insitu.run.loop import Coordinator, RunResult, client_seed
from insitu.run.validation import check_eval_result, check_fit_result

__all__ = ["Coordinator", "Evaluation", "History", "RoundRecord", "RunResult", "check_eval_result", "check_fit_result", "client_seed"]
