#!/usr/bin/env bash
# Installs what folio needs, skipping what is there: `scripts/setup.sh` for all of
# it, or any of: rust wasm wasm-bindgen wasm-pack browser data page
# (page: build the page's wasm into pkg/).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ "$#" -gt 0 ] || set -- rust wasm wasm-bindgen wasm-pack browser data
for part in "$@"; do
    case "$part" in
        rust) ensure_rust ;;
        wasm) ensure_wasm_target ;;
        wasm-bindgen) ensure_wasm_bindgen ;;
        wasm-pack) ensure_wasm_pack ;;
        page) build_page ;;
        browser) ensure_browser ;;
        data) ensure_corpus ;;
        *) die "unknown part '$part' (rust wasm wasm-bindgen wasm-pack browser data page)" ;;
    esac
done
