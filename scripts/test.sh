#!/usr/bin/env bash
# The whole test suite. Installs what is missing first (Rust's wasm32 target,
# wasm-bindgen-cli, Chromium + ChromeDriver, the Shakespeare corpus, sccache).
# Each build happens once: the native test build is also the binary's and the
# end-to-end tests', the wasm test build is also the page's.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
step "folio test suite: setting up what is missing"
ensure_rust
ensure_build_cache
ensure_wasm_target
ensure_wasm_bindgen
ensure_browser
ensure_corpus
cd "$FOLIO_ROOT"
# One package selection for every native cargo command, so that they all resolve
# the same features and share one build (folio-web is wasm-only).
native=(--workspace --exclude folio-web --release --locked)

step "formatting"
cargo fmt --all --check

step "native build: every crate, test and the folio binary (≈ 12 min the first time on 2 cores)"
cargo_progress "native" test "${native[@]}" --no-run

step "the folio binary reuses the test build (scripts/run.sh compiles nothing more)"
rebuilt="$(cargo build --release --locked -p folio --message-format short 2>&1 | grep -E '^ *Compiling ' || true)"
[ -z "$rebuilt" ] || die "cargo build -p folio recompiled what the test build had built, so a \
feature differs between the two; name it in crates/folio/Cargo.toml:
$rebuilt"

step "lints (clippy, warnings are errors; ≈ 4 min the first time)"
cargo_progress "clippy" clippy "${native[@]}" --all-targets -- -D warnings

step "native tests"
cargo test "${native[@]}"

# wasm-bindgen tests in headless Chromium (cargo runs them with
# wasm-bindgen-test-runner, .cargo/config.toml): the delta codecs, the client
# loop's state machine, WebGPU against the CPU backend. One build for the three
# crates and the page.
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-300}"
wasm=(--target wasm32-unknown-unknown --release --locked -p folio-fed -p folio-client -p folio-web)
step "wasm build: the browser tests and the page (≈ 12 min the first time on 2 cores)"
cargo_progress "wasm" test "${wasm[@]}" --no-run
step "browser tests in headless Chromium"
cargo test "${wasm[@]}"

build_page

step "end-to-end: the page in headless Chromium tabs against the aggregator"
cargo test "${native[@]}" --test tabs -- --ignored --test-threads=1 --nocapture

step "all tests passed in ${SECONDS}s"
