# Sourced by scripts/test.sh: make sure a Chromium is there for the browser
# test (tests/test_browser.py), which drives it with the Python `playwright`
# package from the test extra, pointed at this browser; Playwright never
# downloads a browser of its own.
#
# As root on Debian (CI, containers) a missing Chromium is installed with
# apt-get; anywhere else nothing is installed and the browser test is skipped
# with the reason. A failed install is reported, never fatal: the rest of the
# suite still runs and the browser test says why it skipped.

bastion_find_chromium() {
    local name
    if [ -n "${BASTION_CHROMIUM:-}" ] && [ -x "$BASTION_CHROMIUM" ]; then
        echo "$BASTION_CHROMIUM"
        return 0
    fi
    for name in chromium chromium-browser; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

bastion_ensure_chromium() {
    local found
    if found="$(bastion_find_chromium)"; then
        echo "==> Chromium for the browser test: $found"
        return 0
    fi
    if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1 || [ ! -f /etc/debian_version ]; then
        echo "==> no Chromium, and no root apt-get to install it: the browser test will be skipped"
        return 0
    fi
    echo "==> installing Debian's chromium with apt-get for the browser test"
    local started=$SECONDS
    if DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
        echo "==> chromium installed in $((SECONDS - started)) s: $(bastion_find_chromium)"
    else
        echo "warning: installing chromium failed: the browser test will be skipped" >&2
    fi
    return 0
}
