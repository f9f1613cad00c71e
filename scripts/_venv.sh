# Sourced by scripts/demo.sh and scripts/test.sh: make sure the project venv
# (.venv) exists and holds the project with the extras the scripts need.
#
# After sourcing: ROOT (the repository) and PY (the venv's python) are set.
# Idempotent: pip runs only when setup.cfg / pyproject.toml changed since the
# last successful install, or when a script asks for an extra that install
# did not have, so a second run costs a second.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
# The extras every script installs; a script may ask for more
# (bastion_ensure_venv spark: scripts/test.sh, for the Spark engine's tests).
# The stamp records what was installed, so a script asking for fewer extras
# than the last install (demo after test) does not reinstall.
EXTRAS="demo,test"
STAMP="$VENV/.bastion-install-stamp"

_bastion_base_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: Bastion needs Python 3.11 or newer (python3.11 or python3 on PATH)" >&2
    return 1
}

_bastion_make_venv() {
    local base
    base="$(_bastion_base_python)"
    echo "==> creating the project venv .venv with $base ($("$base" --version 2>&1))"
    if ! "$base" -m venv "$VENV" 2>/dev/null; then
        # Debian splits ensurepip out of the interpreter; install it only
        # when we are allowed to (root) and only then.
        rm -rf "$VENV"
        if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
            local minor
            minor="$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            echo "==> python's venv module is missing: installing python${minor}-venv with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${minor}-venv" ||
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            "$base" -m venv "$VENV"
        else
            echo "error: '$base -m venv' failed; install your distribution's python3-venv package" >&2
            return 1
        fi
    fi
}

_bastion_install_hash() {
    (cd "$ROOT" && cat setup.cfg pyproject.toml 2>/dev/null) |
        "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

# The stamp: line 1 the hash of setup.cfg + pyproject.toml, line 2 the installed extras (comma-separated).
bastion_ensure_venv() {
    if [ ! -x "$PY" ]; then
        _bastion_make_venv
    fi
    local extras="$EXTRAS" extra want have="" installed="" missing=""
    for extra in "$@"; do
        extras="$extras,$extra"
    done
    want="$(_bastion_install_hash)"
    if [ -f "$STAMP" ]; then
        have="$(sed -n 1p "$STAMP")"
        installed="$(sed -n 2p "$STAMP")"
    fi
    for extra in ${extras//,/ }; do
        case ",$installed," in
            *",$extra,"*) ;;
            *) missing="$missing $extra" ;;
        esac
    done
    if [ "$want" != "$have" ] || [ -n "$missing" ]; then
        # Keep the extras installed before up to date too (a changed setup.cfg may change their pins).
        for extra in ${installed//,/ }; do
            case ",$extras," in
                *",$extra,"*) ;;
                *) extras="$extras,$extra" ;;
            esac
        done
        echo "==> installing Bastion and its dependencies into .venv (pip install -e '.[$extras]')"
        local started=$SECONDS
        "$PY" -m pip install --quiet -e "$ROOT[$extras]"
        printf '%s\n%s\n' "$want" "$extras" >"$STAMP"
        echo "==> installed in $((SECONDS - started)) s"
    else
        echo "==> .venv is up to date (setup.cfg and pyproject.toml unchanged, extras $extras installed)"
    fi
}
