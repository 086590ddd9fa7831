#!/usr/bin/env bash
# Refresh constraints/cpu.txt, the exact versions scripts/setup.sh installs: a fresh environment with the newest
# releases that pyproject.toml's ranges admit (torch stays at the CPU pin), then the whole test suite in it; the lock
# is rewritten only if every test passes. Review the diff of constraints/cpu.txt and commit it.
#   scripts/lock.sh            (about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(mktemp -d /tmp/nsa-eval-lock.XXXXXX)
trap 'rm -rf "$VENV"' EXIT
LOCK=none VENV="$VENV" scripts/setup.sh --dev
NSA_EVAL_LOCK_REFRESH=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider
{
  echo "# Exact versions the whole test suite passed with on a CPU machine (Python 3.11), read by scripts/setup.sh as pip"
  echo "# constraints. Written by scripts/lock.sh (newest releases, then the full test suite); do not edit by hand."
  echo "# $(date -u +%Y-%m-%d), $("$VENV/bin/python" --version)"
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^nsa-eval=='
} > constraints/cpu.txt.new
mv constraints/cpu.txt.new constraints/cpu.txt
echo "lock: constraints/cpu.txt rewritten ($(grep -c '==' constraints/cpu.txt) packages); git diff constraints/ shows the upgrades"
