#!/usr/bin/env bash
# Install what is missing, then run the whole stack locally and a demo against it.
# Extra arguments go to `nexusctl dev run-all`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh
exec .venv/bin/nexusctl dev run-all --demo "$@"
