#!/usr/bin/env bash
# Installs what folio needs, skipping what is there: `scripts/setup.sh` for all of
# it, or any of: rust wasm wasm-bindgen browser data.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ "$#" -gt 0 ] || set -- rust wasm wasm-bindgen browser data
for part in "$@"; do
    case "$part" in
        rust) ensure_rust ;;
        wasm) ensure_wasm_target ;;
        wasm-bindgen) ensure_wasm_bindgen ;;
        browser) ensure_browser ;;
        data) ensure_corpus ;;
        *) die "unknown part '$part' (rust wasm wasm-bindgen browser data)" ;;
    esac
done
