#!/usr/bin/env bash
# Set everything up (project venv + install) and run the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
started=$SECONDS
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
bastion_ensure_venv spark  # the spark extra: PySpark, for the Spark engine's tests
# shellcheck source=scripts/_browser.sh
source "$(dirname "${BASH_SOURCE[0]}")/_browser.sh"
bastion_ensure_chromium  # for tests/test_browser.py; skipped there with the reason if absent
# shellcheck source=scripts/_java.sh
source "$(dirname "${BASH_SOURCE[0]}")/_java.sh"
bastion_ensure_java  # for the Spark engine's tests (Java 17 or 21); skipped there with the reason if absent
cd "$ROOT"

# With no path given, pytest runs setup.cfg's testpaths (tests/); a path given
# (scripts/test.sh tests/test_demo.py -k ...) narrows the run instead of adding to it.
# The trust boundary: the owner's side imports only the kernel's contract (setup.cfg [importlinter]).
echo "==> lint-imports"
"$VENV/bin/lint-imports" --no-cache
echo "==> python -m pytest -p no:cacheprovider $*"
status=0
"$PY" -m pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
    # pytest's "no tests collected" must never look like a green run.
    echo "error: pytest collected no tests (exit status 5): failing" >&2
    status=1
fi
echo "==> scripts/test.sh wall time: $((SECONDS - started)) s (pytest exit status $status)"
exit "$status"
