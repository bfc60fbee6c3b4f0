#!/usr/bin/env bash
# Run the tests on any machine, setting up .venv first: bash scripts/test.sh [pytest args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup_venv.sh"
bash scripts/sdk_envs.sh  # the client SDK venvs (.venv-sdk/) the end-to-end tests drive mintd with
source scripts/system_deps.sh  # the PostgreSQL server the shared-catalog tests start clusters of

rc=0
python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$rc"
