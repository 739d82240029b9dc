#!/usr/bin/env bash
# Times a README command as a newcomer meets it: from a fresh clone of this
# checkout's HEAD, with a cold target/ (tools and the sccache cache as this machine
# has them). `scripts/measure-setup.sh run` runs scripts/run.sh until the page is
# served and its device code is ready; `scripts/measure-setup.sh test` runs
# scripts/test.sh (with CI=true, as CI does). Keeps the timestamped log under
# target/measure/ and prints: first output, longest silence, when the page was
# served (run), when its wasm was ready (run) or the suite passed (test). A cold
# run: SCCACHE_DIR=$(mktemp -d) scripts/measure-setup.sh run.
set -euo pipefail
what="${1:-}"
case "$what" in
    run | test) ;;
    *) echo "usage: scripts/measure-setup.sh run|test" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
clone="$(mktemp -d /tmp/folio-fresh-XXXX)"
logs="$repo/target/measure"
mkdir -p "$logs"
log="$logs/$what-$(date +%Y%m%d-%H%M%S).log"
git clone -q "$repo" "$clone"
unset CARGO_TARGET_DIR FOLIO_DATA_DIR
# A running sccache server keeps the cache it started with: restart it so that
# SCCACHE_DIR (e.g. an empty one, for a cold run) applies.
if command -v sccache >/dev/null; then sccache --stop-server >/dev/null 2>&1 || true; fi
echo "measuring scripts/$what.sh in $clone; log: $log" >&2

start=$EPOCHREALTIME
since() { awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
# Each output line with the seconds since the start.
stamp() {
    local line
    while IFS= read -r line; do
        printf '%7s %s\n' "$(since)" "$line"
    done
}
# The first line's time and the longest gap between lines, from the stamped log,
# up to `$1` seconds (the page's readiness for run: the server is quiet after it).
silences() {
    awk -v until="${1:-1e9}" '{ t = $1 + 0; if (t > until) exit; if (NR == 1) first = t
           if (t - last > gap) gap = t - last; last = t }
         END { printf "first output after %.1f s; longest silence %.1f s", first, gap }' "$log"
}

status=0
until=""
if [ "$what" = test ]; then
    (cd "$clone" && CI=true scripts/test.sh </dev/null 2>&1) | stamp >"$log" || status=$?
    summary="suite $( [ "$status" = 0 ] && echo passed || echo FAILED ) after $(since) s"
else
    set -m
    (cd "$clone" && scripts/run.sh </dev/null 2>&1 | stamp >"$log") &
    runner=$!
    set +m
    served="" ready=""
    while kill -0 "$runner" 2>/dev/null; do
        if [ -z "$served" ] && curl -sf -o /dev/null http://127.0.0.1:8080/; then served="$(since)"; fi
        if [ -n "$served" ] && grep -q '"state":"ready"' "$clone/pkg/build.json" 2>/dev/null; then
            ready="$(since)"
            break
        fi
        sleep 1
    done
    kill -TERM -- "-$runner" 2>/dev/null || true
    wait "$runner" 2>/dev/null || true
    summary="page served after ${served:-never} s, its device code ready after ${ready:-never} s"
    until="$ready"
fi
printf 'scripts/%s.sh from a fresh clone: %s; %s\n' "$what" "$summary" "$(silences "$until")" | tee -a "$log"
if command -v sccache >/dev/null; then sccache --show-stats | grep -E '^(Compile requests|Cache hits|Cache misses|Cache location) ' | tee -a "$log"; fi
# The slowest crates of each build, from cargo's timing reports (scripts/test.sh).
for report in "$clone"/target/cargo-timings/cargo-timing.html "$clone"/target/wasm/cargo-timings/cargo-timing.html; do
    [ -f "$report" ] || continue
    python3 - "$report" <<'PY' | tee -a "$log"
import json, re, sys
html = open(sys.argv[1]).read()
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\n\]);", html, re.S).group(1))
units.sort(key=lambda u: -u["duration"])
total = sum(u["duration"] for u in units)
print(f"{sys.argv[1].split('/target/')[1]}: {len(units)} units, {total / 60:.1f} min of rustc in all; slowest:")
for u in units[:8]:
    print(f"  {u['name']} {u['version']} {u['target'].strip() or 'lib'}: {u['duration']:.0f} s")
PY
done
rm -rf "$clone"
exit "$status"
