#!/usr/bin/env bash
# HeartLoop front door.
#   ./run.sh serve   create .venv if needed, then start the service with embedded defaults
#                    (SQLite, local files, CPU, review UI on http://127.0.0.1:8080/) and push 3
#                    synthetic patients to it; the first start prints the admin's password once
#   ./run.sh test    install what the tests need (apt: dcmtk, dicom3tools, postgresql, chromium,
#                    chromium-driver; pip) and run them
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    # torch is pinned (==2.13.0, CPU wheel); install it first so nothing pulls a CUDA build.
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q "torch==2.13.0"
    fi
    if ! "$VENV/bin/python" -c "import heartloop, pytest, pynetdicom" >/dev/null 2>&1 \
        || [ pyproject.toml -nt "$VENV/.installed" ]; then
        "$VENV/bin/pip" install -q -e ".[test]"
        touch "$VENV/.installed"
    fi
}

ensure_system_packages() {
    local missing=()
    # dcmtk's own tools: pynetdicom puts scripts of the same names into an activated .venv.
    /usr/bin/storescu --version 2>/dev/null | grep -qi dcmtk || missing+=(dcmtk)
    command -v dciodvfy >/dev/null || missing+=(dicom3tools)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    # The browser tests drive Debian's Chromium through its chromedriver.
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "missing system packages: ${missing[*]} — install them with: sudo apt-get install ${missing[*]}" >&2
            exit 1
        fi
    fi
}

case "${1:-}" in
    serve)
        shift
        ensure_venv
        exec "$VENV/bin/heartloop" serve --data-dir "${HEARTLOOP_DATA:-heartloop-data}" --demo 3 "$@"
        ;;
    test)
        shift
        ensure_system_packages
        ensure_venv
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "usage: ./run.sh serve | test [pytest args]" >&2
        exit 2
        ;;
esac
