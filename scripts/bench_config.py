"""scripts/bench config: time parsing the dstack corpus (all 134 valid files), warm and cold.

Prints per-phase figures; the last line is JSON with ``files`` and ``parse_s`` (the best of
several timed passes over every file, reading included).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dstack-configs" / "valid"


def main() -> int:
    t0 = time.perf_counter()
    from meshgpu.config import load_config  # noqa: PLC0415 - timing the import is the point

    import_s = time.perf_counter() - t0
    files = sorted(CORPUS.glob("*.yml"))
    if not files:
        print(f"no corpus at {CORPUS}", file=sys.stderr)
        return 1
    passes = []
    for _ in range(5):
        t = time.perf_counter()
        for f in files:
            load_config(f)
        passes.append(time.perf_counter() - t)
    print(f"import meshgpu.config: {import_s * 1000:.1f} ms")
    print(f"first pass over {len(files)} files: {passes[0] * 1000:.1f} ms")
    print(
        f"best of {len(passes)} passes: {min(passes) * 1000:.1f} ms "
        f"({min(passes) / len(files) * 1e6:.0f} us/file)"
    )
    print(
        json.dumps(
            {
                "files": len(files),
                "parse_s": round(min(passes), 4),
                "first_pass_s": round(passes[0], 4),
                "import_s": round(import_s, 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
