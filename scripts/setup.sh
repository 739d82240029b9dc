#!/usr/bin/env bash
# Installs what folio needs, skipping what is there: `scripts/setup.sh` for all of
# it, or any of: rust wasm wasm-bindgen browser data cache nats page
# (cache: sccache; page: build the page's wasm into pkg/, its threaded CPU build
# into pkg/threads/).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ "$#" -gt 0 ] || set -- rust cache wasm wasm-bindgen browser data nats
for part in "$@"; do
    case "$part" in
        rust) ensure_rust ;;
        wasm) ensure_wasm_target ;;
        wasm-bindgen) ensure_wasm_bindgen ;;
        browser) ensure_browser ;;
        data) ensure_corpus ;;
        cache) ensure_build_cache ;;
        nats) ensure_nats ;;
        page) ensure_build_cache
            build_page || die "building the page's device code failed (its errors are above)"
            build_threaded_page || die "building the page's threaded CPU build failed (its errors are above)" ;;
        *) die "unknown part '$part' (rust wasm wasm-bindgen browser data cache nats page)" ;;
    esac
done
