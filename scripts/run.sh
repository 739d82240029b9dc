#!/usr/bin/env bash
# The main job: the aggregator with the shipped pre-trained model, serving the page
# on http://127.0.0.1:8080. Installs what is missing first. With arguments, runs
# `folio <arguments>` instead (e.g. `scripts/run.sh data stats`).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_rust
ensure_corpus
cd "$FOLIO_ROOT"
cargo build --release --locked -q -p folio
folio="$CARGO_TARGET_DIR/release/folio"
if [ "$#" -gt 0 ]; then
    exec "$folio" "$@"
fi
step "the federated Shakespeare dataset"
"$folio" data stats
step "folio serve (Ctrl-C stops it; run \`$folio client\` in other terminals to add devices)"
exec "$folio" serve
