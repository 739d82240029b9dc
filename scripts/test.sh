#!/usr/bin/env bash
# The whole test suite. Installs what is missing first (Rust's wasm32 target,
# wasm-bindgen-cli, Chromium + ChromeDriver, Firefox ESR, brotli, the
# Shakespeare corpus, sccache, nats-server, Prometheus, nginx, Caddy, pebble).
# Each build happens once: the native test build is also the binary's and the
# end-to-end tests', the wasm test build is also the page's (its threaded CPU
# build is the one wasm build of its own).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# First, in a second: every command these scripts and the tests call is on a fresh
# machine or installed by the scripts before its first use.
step "the commands the scripts and tests call: each on a fresh machine, or installed before it is used"
python3 "$FOLIO_ROOT/scripts/check-tools.py" --self-test
python3 "$FOLIO_ROOT/scripts/check-tools.py"
step "folio test suite: setting up what is missing"
ensure_rust
ensure_build_cache
ensure_wasm_target
ensure_browser
ensure_corpus
ensure_nats
ensure_deploy_tools
cd "$FOLIO_ROOT"
# One package selection for every native cargo command, so that they all resolve
# the same features and share one build (folio-web is wasm-only).
native=(--workspace --exclude folio-web --release --locked)
# The same for the wasm32 side: the browser tests of four crates and the page.
wasm=(--target wasm32-unknown-unknown --target-dir "$BUILD_DIR/wasm" --profile wasm --locked
    -p folio-fed -p folio-secagg -p folio-client -p folio-web)

step "formatting"
cargo fmt --all --check

# The builds run side by side: on 2 cores each spends minutes on one big crate
# with a core to spare. The wasm side has its own target dir because cargo locks
# a target dir while it builds; wasm-bindgen-cli installs into its own too. Each
# build leaves cargo's timing report (the slowest crates) in cargo-timings/.
step "building side by side: the native crates and tests, the wasm crates and tests, the page's threaded build, wasm-bindgen-cli (≈ 35 min the first time on 2 cores)"
ensure_wasm_bindgen &
tools=$!
build_threaded_wasm &
threaded_build=$!
cargo_progress "wasm" test "${wasm[@]}" --no-run --timings &
wasm_build=$!
cargo_progress "native" test "${native[@]}" --no-run --timings

step "the folio binary reuses the test build (scripts/run.sh compiles nothing more)"
rebuilt="$(cargo build --release --locked -p folio --message-format short 2>&1 | grep -E '^ *Compiling ' || true)"
[ -z "$rebuilt" ] || die "cargo build -p folio recompiled what the test build had built, so a \
feature differs between the two; name it in crates/folio/Cargo.toml:
$rebuilt"

step "lints (clippy, warnings are errors; ≈ 2 min the first time)"
cargo_progress "clippy" clippy "${native[@]}" --all-targets -- -D warnings

wait "$wasm_build" || die "the wasm build failed (its errors are above)"
wait "$tools" || die "installing wasm-bindgen-cli failed (its errors are above)"
wait "$threaded_build" || die "the page's threaded build failed (its errors are above)"

# The page and its threaded build, bound and brotli-compressed (a minute of one
# core each) while the native and browser tests run; the end-to-end tests need them.
{ build_page && build_threaded_page; } &
page=$!

step "native tests"
cargo test "${native[@]}"

# wasm-bindgen tests in headless Chromium (cargo runs them with
# wasm-bindgen-test-runner, .cargo/config.toml): the delta codecs, secure
# aggregation's protocol, the client loop's state machine, WebGPU against the
# CPU backend.
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-300}"
step "browser tests in headless Chromium"
cargo test "${wasm[@]}"

wait "$page" || die "building the page failed (its errors are above)"

step "end-to-end: the page in headless Chromium tabs against the aggregator"
cargo test "${native[@]}" --test tabs --test crowd --test edges \
    --test privacy --test secure --test asynchronous --test device_check --test own_text --test secure_context -- --ignored --test-threads=1 --nocapture

step "all tests passed in ${SECONDS}s"
