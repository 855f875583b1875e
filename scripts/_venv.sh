# Shared by scripts/test and scripts/demo: make sure .venv exists and holds the project with
# the requested extra. Re-installs only when pyproject.toml changed since the last install.
VENV="${QKDNODE_VENV:-$PWD/.venv}"

ensure_venv() {
    local extra="${1:-}"
    local python="${PYTHON:-python3}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "== creating virtual environment in $VENV" >&2
        "$python" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    local spec="."
    [ -n "$extra" ] && spec=".[$extra]"
    local stamp="$VENV/.qkdnode-installed-$extra"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "== installing qkdnode${extra:+ with extra '$extra'}" >&2
        "$VENV/bin/python" -m pip install --quiet -e "$spec"
        touch "$stamp"
    fi
}
