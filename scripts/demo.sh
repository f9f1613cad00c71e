#!/usr/bin/env bash
# Set everything up (project venv + install) and run the demo:
# an owner workspace, a scientist, the executor and JupyterLab on 127.0.0.1.
# Usage: bash scripts/demo.sh [--setup-only | --no-lab] [other owner_console.demo options]
set -euo pipefail
started=$SECONDS
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
bastion_ensure_venv
cd "$ROOT"
echo "==> set-up took $((SECONDS - started)) s; starting the demo"
exec "$PY" -m owner_console.demo "$@"
