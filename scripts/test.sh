#!/usr/bin/env bash
# Install what is missing, then run every check: ruff, mypy and the whole pytest suite.
# Extra arguments go to pytest. Every check runs even after one fails, so one run shows
# all the problems; the exit status is non-zero if any failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh

failed=()

echo "== ruff check"
.venv/bin/ruff check . || failed+=(ruff)

echo "== mypy"
.venv/bin/mypy schemas nexus crucible_agent sled_agent tests bench deploy examples || failed+=(mypy)

echo "== pytest"
.venv/bin/pytest -p no:cacheprovider "$@" || failed+=(pytest)

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all checks passed"
