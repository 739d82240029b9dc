#!/usr/bin/env bash
# The main job: the aggregator with the shipped pre-trained model, serving the page
# (each tab that opens it trains as one device) on http://127.0.0.1:8080. Installs
# what is missing first. With arguments, runs `folio <arguments>` instead (e.g.
# `scripts/run.sh data stats`; `scripts/run.sh serve ...` builds the page first).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_rust
ensure_corpus
cd "$FOLIO_ROOT"
cargo build --release --locked -q -p folio
folio="$CARGO_TARGET_DIR/release/folio"
if [ "$#" -gt 0 ] && [ "$1" != serve ]; then
    exec "$folio" "$@"
fi
build_page
if [ "$#" -gt 0 ]; then
    exec "$folio" "$@"
fi
step "the federated Shakespeare dataset"
"$folio" data stats
step "folio serve: open http://127.0.0.1:8080 in several tabs (each is a device), Ctrl-C stops"
exec "$folio" serve
