# Sourced by the benches beside other systems: `ensure_venv DIR MODULE PACKAGE`
# makes a Python venv in DIR holding PACKAGE (pip's spec) unless MODULE already
# imports there, and builds folio. The README's main commands never use it.
ensure_venv() {
    local venv="$1" module="$2" package="$3"
    if ! "$venv/bin/python" -c "import $module" 2>/dev/null; then
        echo "==> installing $package into $venv (once)" >&2
        python3 -m venv "$venv" || { echo "python3 -m venv failed: apt-get install python3-venv, then run again" >&2; exit 1; }
        "$venv/bin/pip" install -q "$package"
    fi
    echo "==> building folio (release)" >&2
    cargo build -q --release -p folio --bin folio
}
