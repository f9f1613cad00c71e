# Sourced by scripts/test.sh: make sure a Java runtime that Spark 4.0 runs on
# (17 or 21) is there for the Spark engine's tests (tests/test_spark_engine.py).
#
# The machine's java is used when it is one of those (JAVA_HOME first, then
# java on PATH); as root on Debian (CI, containers) a missing one is installed
# with apt-get (openjdk-17-jre-headless, or openjdk-21-jre-headless where the
# release has no 17); anywhere else nothing is installed and the Spark tests
# are skipped with the reason.  A failed install is reported, never fatal.
# After sourcing and bastion_ensure_java, JAVA_HOME names the runtime found
# (exported), so that PySpark starts that one.

# The major version of a java binary ("17", "21"...), empty if it does not run.
bastion_java_major() {
    local line
    line="$("$1" -version 2>&1 | head -n 1)" || return 1
    # 'openjdk version "17.0.15" 2025-04-15', 'java version "1.8.0_392"'
    line="${line#*\"}"
    line="${line%%\"*}"
    case "$line" in
        1.*) line="${line#1.}" ;;
    esac
    echo "${line%%[.+-]*}"
}

# A java binary of version 17 to 21, found on this machine.
bastion_find_java() {
    local candidate major resolved
    for candidate in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java 2>/dev/null)" \
            /usr/lib/jvm/java-17-openjdk-*/bin/java /usr/lib/jvm/java-21-openjdk-*/bin/java; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        major="$(bastion_java_major "$candidate")" || continue
        if [ -n "$major" ] && [ "$major" -ge 17 ] 2>/dev/null && [ "$major" -le 21 ]; then
            resolved="$(readlink -f "$candidate")"
            echo "${resolved:-$candidate}"
            return 0
        fi
    done
    return 1
}

bastion_ensure_java() {
    local found package
    if ! found="$(bastion_find_java)"; then
        if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1 || [ ! -f /etc/debian_version ]; then
            echo "==> no Java 17 or 21, and no root apt-get to install one: the Spark tests will be skipped" \
                 "(install openjdk-17-jre-headless, or set JAVA_HOME to a Java 17 or 21)"
            return 0
        fi
        local started=$SECONDS
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
        for package in openjdk-17-jre-headless openjdk-21-jre-headless; do
            if apt-cache show "$package" >/dev/null 2>&1; then
                echo "==> installing Debian's $package with apt-get for the Spark tests"
                if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null; then
                    break
                fi
                echo "warning: installing $package failed" >&2
            fi
        done
        if ! found="$(bastion_find_java)"; then
            echo "warning: no Java 17 or 21 could be installed: the Spark tests will be skipped" >&2
            return 0
        fi
        echo "==> Java installed in $((SECONDS - started)) s"
    fi
    # JAVA_HOME is the directory above bin/java.
    JAVA_HOME="$(dirname "$(dirname "$found")")"
    export JAVA_HOME
    echo "==> Java $(bastion_java_major "$found") for the Spark tests: $JAVA_HOME"
    return 0
}
