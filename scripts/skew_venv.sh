#!/usr/bin/env bash
# A second virtual environment with another torch (default 2.14.1), for tests/test_version_skew.py:
# a client on the pinned torch against a daemon on this one. Prints the environment's python.
#   LIBREMOTE_TEST_DAEMON_PYTHON=$(bash scripts/skew_venv.sh) scripts/test.sh tests/test_version_skew.py
# On x86_64 pip takes torch 2.14.1 from the machine's wheel cache where it has one; elsewhere it
# downloads it (a CUDA build of several GB: it runs on the CPU too).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LIBREMOTE_SKEW_VENV:-$repo/.venv-skew}"
torch_version="${LIBREMOTE_SKEW_TORCH:-2.14.1}"
if ! "$venv/bin/python" -c "import torch, zmq, msgpack, numpy; assert torch.__version__.startswith('$torch_version')" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "torch==$torch_version" "pyzmq>=25" "msgpack>=1.0" numpy >&2
fi
echo "$venv/bin/python"
