#!/usr/bin/env bash
# Regenerate requirements/lock.txt: resolve pyproject's ranges to today's newest releases in a throwaway
# venv (CPU torch==2.13.0, the build the README's commands install where there is no GPU), then freeze.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${LOCK_EXTRAS:-dev}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
$pip install -q torch==2.13.0
$pip install -q -e ".[$extras]"
$pip check
{
  echo "# The exact versions the README's commands install (make setup). Regenerate with: make lock"
  echo "# Resolved $(date -u +%Y-%m-%d) for Python $($work/venv/bin/python -c 'import platform; print(platform.python_version())'), extras [$extras]."
  echo "# torch is pinned without a local label: pip takes the CPU build where one lies on local disk, PyPI's otherwise."
  $pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*$/\1/'
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
