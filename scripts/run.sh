#!/usr/bin/env bash
# The main job: the aggregator with the shipped pre-trained model, serving the page
# (each tab that opens it trains as one device) on http://127.0.0.1:8080. Installs
# what is missing first. The aggregator starts as soon as its binary is built; the
# page's device code (wasm) builds behind it, and open tabs join when it is ready.
# With arguments, runs `folio <arguments>` instead (e.g. `scripts/run.sh data
# stats`; `scripts/run.sh serve ...` serves with those options).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
step "folio: setting up what is missing, then serving the page"
ensure_rust
ensure_build_cache
ensure_corpus
cd "$FOLIO_ROOT"
step "building the aggregator, the native folio binary (≈ 8 min the first time on 2 cores, seconds after)"
cargo_progress "aggregator" build --release --locked -p folio
folio="$TARGET_DIR/release/folio"
if [ "$#" -gt 0 ] && [ "$1" != serve ]; then
    release_build_lock
    exec "$folio" "$@"
fi
if [ "$#" -eq 0 ]; then
    step "the federated Shakespeare dataset"
    "$folio" data stats
    set -- serve
fi
build_page_behind_server
# The page's builder holds the build lock until it is done; the server does not.
release_build_lock
step "folio serve: open http://127.0.0.1:8080 in several tabs (each is a device; they join once the page is built), Ctrl-C stops"
"$folio" "$@"
