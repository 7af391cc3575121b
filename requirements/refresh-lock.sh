#!/usr/bin/env bash
# The one command that refreshes the dependency locks (run it from anywhere, commit both files):
#
#     bash requirements/refresh-lock.sh
#
# Resolves pyproject.toml (with the `test` extra) for CPython 3.11 on x86_64 manylinux_2_28 with
# uv's resolver, which reads package metadata only (no wheel is downloaded, no backtracking through
# builds): lock-cpu.txt with the CPU torch wheel (no nvidia-*/triton), lock-gpu.txt with torch 2.11
# from PyPI (CUDA). Installs then use them as pip constraints: `pip install -c requirements/lock-cpu.txt
# -e ".[test]"`, and `.ci/run` checks the installed set against the lock (requirements/check_lock.py).
# UV names a uv binary to use; without one on PATH, uv (pinned) is installed into a temporary venv.
# TORCH_WHEELS names the folder holding torch-2.13.0+cpu (default /opt/wheels, as on this project's
# machines).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8
UV=${UV:-$(command -v uv || true)}
if [ -z "$UV" ] || [ "$("$UV" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m venv "$tmp/venv"
    "$tmp/venv/bin/python" -m pip install -q "uv==$UV_VERSION"
    UV="$tmp/venv/bin/uv"
fi
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
common=(pyproject.toml --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --no-emit-find-links --custom-compile-command "bash requirements/refresh-lock.sh" --quiet)
"$UV" pip compile "${common[@]}" --find-links "$TORCH_WHEELS" requirements/torch-cpu.in \
    -o requirements/lock-cpu.txt
"$UV" pip compile "${common[@]}" requirements/torch-gpu.in -o requirements/lock-gpu.txt
# The +cpu build exists for Linux only (PyTorch's CPU index; PyPI's Linux wheel is the CUDA one).
# macOS and Windows take PyPI's own wheel of the same version, which is CPU-only there: the pin
# splits by platform marker, which pip applies to constraints (check_lock.py evaluates it too).
python3 - <<'PY'
import re
from pathlib import Path
lock = Path("requirements/lock-cpu.txt")
text, n = re.subn(
    r"^torch==([0-9.]+)\+cpu$",
    r'torch==\1+cpu ; sys_platform == "linux"\ntorch==\1 ; sys_platform != "linux"',
    lock.read_text(),
    flags=re.M,
)
if n != 1:
    raise SystemExit("error: lock-cpu.txt has no torch==X+cpu pin to split by platform")
lock.write_text(text)
PY
if grep -qiE '^(nvidia-|triton)' requirements/lock-cpu.txt; then
    echo "error: lock-cpu.txt pins CUDA wheels; is torch-2.13.0+cpu in $TORCH_WHEELS?" >&2
    exit 1
fi
echo "wrote requirements/lock-cpu.txt ($(grep -c '^[a-z]' requirements/lock-cpu.txt) pins)" \
     "and requirements/lock-gpu.txt ($(grep -c '^[a-z]' requirements/lock-gpu.txt) pins)"
