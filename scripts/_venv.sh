# Shared by scripts/*: make sure .venv exists with the project (and, if asked, its extras).
# Usage: . scripts/_venv.sh [extra[,extra...]]    e.g. test,torch
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

_pick_python() {
    for cand in python3.13 python3.12 python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 &&
            "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$cand"
            return 0
        fi
    done
    echo "meshgpu needs Python >= 3.11; install it (e.g. apt-get install python3) and rerun" >&2
    return 1
}

if [ ! -x "$PY" ]; then
    echo "==> creating $VENV"
    "$(_pick_python)" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
fi

_extra="${1:-}"
_stamp="$VENV/.installed${_extra:+-$_extra}"
# Reinstall only when pyproject.toml changed since the last install (fast reruns).
if [ ! -f "$_stamp" ] || [ "$ROOT/pyproject.toml" -nt "$_stamp" ]; then
    echo "==> installing meshgpu${_extra:+ [$_extra]} into $VENV"
    "$PY" -m pip install --quiet -e "$ROOT${_extra:+[$_extra]}"
    touch "$_stamp"
fi
