#!/usr/bin/env bash
# The main job. Installs what is missing first. Arguments go to `folio`
# (default: `data stats`).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_rust
ensure_corpus
cd "$FOLIO_ROOT"
[ "$#" -gt 0 ] || set -- data stats
step "folio $*"
cargo run --release --locked -q -p folio -- "$@"
