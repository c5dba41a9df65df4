"""How long a request's token check takes (``ClusterInfo.principal``): the founding admin token
and a user token among ``--users`` x ``--tokens`` live ones. Prints p50/p99 in microseconds; the
last line is JSON. Target (issue #18): <= 200 us p50 per request."""

from __future__ import annotations

import argparse
import json
import statistics
import time

from meshgpu.ops.cluster import ClusterInfo
from meshgpu.security import hash_api_token
from meshgpu.security.secrets import UserToken
from meshgpu.state.access import CreateUser, IssueUserToken
from meshgpu.state.cluster import ClusterState


def measure(users: int = 100, tokens_each: int = 10, rounds: int = 20000) -> dict[str, float]:
    """p50/p99 (us) of a user token's and the founding admin token's check; also the breakdown
    line of ``scripts/bench submit``."""
    cs = ClusterState()
    cs.api_token_hash = hash_api_token("founding-admin-token")
    tokens = []
    for u in range(users):
        cs.apply_cmd(CreateUser(at=0, name=f"user{u}"))
        for _ in range(tokens_each):
            t = UserToken.create()
            tokens.append(str(t))
            cs.apply_cmd(
                IssueUserToken(at=0, user=f"user{u}", token_id=t.token_id, verifier=t.verifier())
            )
    info = ClusterInfo(None, None, cs, "n", "n", "c", lambda: "", lambda: "")  # type: ignore[arg-type]
    result: dict[str, float] = {"live_tokens": len(tokens)}
    for label, token in (
        ("user_token", tokens[len(tokens) // 2]),
        ("admin_token", "founding-admin-token"),
    ):
        xs = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            who = info.principal(token)
            xs.append(time.perf_counter() - t0)
            assert who is not None
        xs.sort()
        result[f"{label}_p50_us"] = round(statistics.median(xs) * 1e6, 2)
        result[f"{label}_p99_us"] = round(xs[int(len(xs) * 0.99)] * 1e6, 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=10, help="per user")
    ap.add_argument("--rounds", type=int, default=20000)
    args = ap.parse_args()
    result = measure(args.users, args.tokens, args.rounds)
    for label in ("user_token", "admin_token"):
        print(f"{label}: p50 {result[f'{label}_p50_us']} us, p99 {result[f'{label}_p99_us']} us")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
