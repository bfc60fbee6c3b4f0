#!/usr/bin/env bash
# Run the mintd demo on any machine, setting up .venv first: bash scripts/demo.sh [demo args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup_venv.sh"

exec mintd demo "$@"
