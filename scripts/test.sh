#!/usr/bin/env bash
# The whole test suite. Installs what is missing first (Rust's wasm32 target,
# wasm-bindgen-cli, Chromium + ChromeDriver, the Shakespeare corpus).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_rust
ensure_wasm_target
ensure_wasm_bindgen
ensure_browser
ensure_corpus
cd "$FOLIO_ROOT"

step "formatting"
cargo fmt --all --check

step "native tests"
# folio-web is wasm-only: natively it would build the whole wgpu stack for nothing.
cargo test --workspace --exclude folio-web --release --locked

step "browser tests: wasm32 in headless Chromium"
WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-300}" \
    cargo test -p folio-web --release --locked --target wasm32-unknown-unknown

step "all tests passed in ${SECONDS}s"
