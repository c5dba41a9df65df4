"""Text reports of a check: enough to see *why* a history is not linearizable without a debugger.

For each failing partition it shows the end of the longest linearizable prefix the search found
(Porcupine's "partial linearization"), the operation that could not come after it, every candidate
that might have gone next with the reason it was rejected, and the operations concurrent with the
stuck one. Times are shown relative to the first invocation in the history.
"""

from __future__ import annotations

import math

from ._checker import CheckResult, PartitionResult, Verdict
from ._history import Op, Outcome

__all__ = ["render"]


def render(result: CheckResult, *, context: int = 8) -> str:
    """The report behind `CheckResult.report()`."""
    history = result.history
    t0 = min((op.call for op in history), default=0)
    fmt = _Formatter(result, t0)
    failed = len(result.failures)
    unknown = sum(p.verdict is Verdict.UNKNOWN for p in result.partitions)
    lines = [
        f"{result.verdict.value.upper()}: {len(history)} ops in {len(result.partitions)} "
        f"partition(s): {failed} not linearizable, {unknown} unknown; {result.dropped} dropped "
        f"(failed, or reads with unknown outcome); {result.steps} steps in "
        f"{result.elapsed:.3f} s"
    ]
    single = len(result.partitions) == 1 and result.partitions[0].key is None
    for part in result.partitions:
        if part.verdict is Verdict.LINEARIZABLE:
            continue
        title = "history" if single else f"key {part.key!r}"
        lines.append("")
        lines.append(
            f"== {title}: {part.verdict.value} ({len(part.ops)} ops, {part.steps} steps) =="
        )
        if part.verdict is Verdict.UNKNOWN:
            lines.append(
                "The budget ran out before the search finished: nothing is proven either way. "
                "Raise timeout or max_steps, or check a shorter history. What follows is the "
                "furthest the search got, often (not always) where a violation is."
            )
        lines.extend(_prefix(part, fmt, context))
        if part.blocker is not None:
            lines.extend(_stuck(part, result, fmt, context))
    return "\n".join(lines)


class _Formatter:
    def __init__(self, result: CheckResult, t0: float) -> None:
        self.history = result.history
        self.model = result.model
        self.t0 = t0
        width = max((len(self.model.describe_op(op)) for op in self.history), default=0)
        self.width = min(width, 40)
        cwidth = max((len(str(op.client)) for op in self.history), default=0)
        self.cwidth = min(cwidth, 12)

    def time(self, t: float | None) -> str:
        if t is None or t == math.inf:
            return "never"
        d = t - self.t0
        return str(d) if isinstance(d, int) else f"{d:.6f}"

    def op(self, index: int) -> str:
        op: Op = self.history[index]
        ret = "?" if op.outcome is Outcome.INFO else self.time(op.ret)
        return (
            f"#{index:<5} {str(op.client):<{self.cwidth}} "
            f"{self.model.describe_op(op):<{self.width}} [{self.time(op.call)} .. {ret}]"
        )


def _prefix(part: PartitionResult, fmt: _Formatter, context: int) -> list[str]:
    order = part.linearization
    lines = [
        f"Longest linearizable prefix found: {len(order)} of {len(part.ops)} ops; "
        f"state after it: {fmt.model.describe_state(part.state)}"
    ]
    shown = order[-context:] if context > 0 else ()
    if len(order) > len(shown):
        lines.append(f"  ... {len(order) - len(shown)} earlier ops")
    start = len(order) - len(shown)
    for pos, index in enumerate(shown, start=start + 1):
        lines.append(f"  {pos:>5}. {fmt.op(index)}")
    return lines


def _stuck(part: PartitionResult, result: CheckResult, fmt: _Formatter, context: int) -> list[str]:
    assert part.blocker is not None
    model = result.model
    blocker = result.history[part.blocker]
    state_text = model.describe_state(part.state)
    lines = [
        f"Cannot linearize next: {fmt.op(part.blocker)}",
        f"  It must take effect before it returns at {fmt.time(blocker.ret)}, but no operation "
        f"that may go next leads to a complete order from state {state_text}:",
    ]
    for index in part.candidates[: 2 * context]:
        legal, after = model.step(part.state, result.history[index])
        why = (
            f"legal (state becomes {model.describe_state(after)}), but no complete order follows"
            if legal
            else f"illegal in state {state_text}"
        )
        lines.append(f"    {fmt.op(index)}  {why}")
    if len(part.candidates) > 2 * context:
        lines.append(f"    ... {len(part.candidates) - 2 * context} more candidates")

    position = {index: pos for pos, index in enumerate(part.linearization, start=1)}
    lo, hi = blocker.call, blocker.effective_ret
    overlapping = [
        index
        for index in part.ops
        if index != part.blocker
        and result.history[index].call <= hi
        and result.history[index].effective_ret >= lo
    ]
    overlapping.sort(key=lambda i: result.history[i].call)
    lines.append(f"  Concurrent with it ({len(overlapping)} ops):")
    for index in overlapping[: 2 * context]:
        where = f"linearized at {position[index]}" if index in position else "not in the prefix"
        lines.append(f"    {fmt.op(index)}  {where}")
    if len(overlapping) > 2 * context:
        lines.append(f"    ... {len(overlapping) - 2 * context} more")
    return lines
