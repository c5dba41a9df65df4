"""dstack's ``rate_limits`` (nginx ``limit_req ... burst=N nodelay``): per service, the rule with
the longest matching prefix applies; each key (the client's IP or a header's value) has a token
bucket refilled at ``rps`` holding ``1 + burst`` requests; a request finding it empty is refused
(429) with how long until the next token. Keys live in a bounded table (least recently used
dropped first), so a flood of distinct keys costs memory once, not without limit. Pure: the
clock is passed in."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshgpu.config.spec import RateLimitRule

MAX_KEYS = 10_000  # per service


def match(rules: tuple[RateLimitRule, ...], path: str) -> RateLimitRule | None:
    """The rule with the longest prefix of ``path`` (None: no rule applies)."""
    best = None
    for rule in rules:
        if path.startswith(rule.prefix) and (best is None or len(rule.prefix) > len(best.prefix)):
            best = rule
    return best


class RateLimiter:
    """The buckets of one service."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def take(self, rule: RateLimitRule, key: str, now: float) -> float:
        """0 when the request may pass (a token taken), else the seconds until one would."""
        capacity = 1.0 + rule.burst
        bkey = (rule.prefix, key)
        tokens, at = self._buckets.pop(bkey, (capacity, now))
        tokens = min(capacity, tokens + (now - at) * rule.rps)
        if tokens >= 1.0:
            self._buckets[bkey] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[bkey] = (tokens, now)
            wait = (1.0 - tokens) / rule.rps
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


__all__ = ["MAX_KEYS", "RateLimiter", "match", "retry_after"]
