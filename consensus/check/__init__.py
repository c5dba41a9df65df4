"""A linearizability checker for histories of concurrent operations.

Record what clients did (`Recorder`, or build `Op`s by hand), pick a sequential specification
(`RegisterModel`, `CasRegisterModel`, `KeyValueModel`, or your own `Model`), and ask::

    result = check(history, KeyValueModel(), timeout=10)
    assert result, result.report()

The search is Wing-Gong-Lowe with memoization, partitioned per key (Porcupine's
P-compositionality). Operations end `ok`, `fail` (no effect: dropped) or `info` (unknown: may take
effect any time after invocation, or never). A budget (`timeout`, `max_steps`) turns a search
that would take too long into `Verdict.UNKNOWN` instead of a hang.
"""

from ._checker import CheckResult, PartitionResult, Verdict, check
from ._history import History, Op, Outcome
from ._model import Model, ModelBase
from ._models import CasRegisterModel, KeyValueModel, RegisterModel
from ._recorder import Call, Recorder

__all__ = [
    "Call",
    "CasRegisterModel",
    "CheckResult",
    "History",
    "KeyValueModel",
    "Model",
    "ModelBase",
    "Op",
    "Outcome",
    "PartitionResult",
    "Recorder",
    "RegisterModel",
    "Verdict",
    "check",
]
