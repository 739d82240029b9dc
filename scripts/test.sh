#!/usr/bin/env bash
# The whole test suite. Installs what is missing first (Rust's wasm32 target,
# wasm-bindgen-cli, wasm-pack, Chromium + ChromeDriver, the Shakespeare corpus).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_rust
ensure_wasm_target
ensure_wasm_bindgen
ensure_wasm_pack
ensure_browser
ensure_corpus
cd "$FOLIO_ROOT"

step "formatting"
cargo fmt --all --check

step "lints (clippy, warnings are errors)"
# folio-web is wasm-only (see below); the rest, tests and benches included.
cargo clippy --workspace --exclude folio-web --all-targets --release --locked -- -D warnings

step "native tests"
# folio-web is wasm-only (natively it would build the whole wgpu stack for
# nothing); folio-e2e needs the page built, below.
cargo test --workspace --exclude folio-web --exclude folio-e2e --release --locked

# wasm-bindgen tests in headless Chromium: the delta codecs, the client loop's
# state machine, WebGPU against the CPU backend.
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-300}"
for crate in folio-fed folio-client folio-web; do
    step "browser tests: $crate (wasm-pack test --headless --chrome)"
    wasm-pack test --headless --chrome --release "crates/$crate"
done

build_page

step "end-to-end: the page in headless Chromium tabs against the aggregator"
cargo test -p folio-e2e --release --locked -- --test-threads=1 --nocapture

step "all tests passed in ${SECONDS}s"
