#!/usr/bin/env bash
# Synchronous against asynchronous rounds on the same devices: `folio simulate
# --population --devices` gives every Shakespeare client a device drawn from the
# speeds measured here (a native client, a tab on the CPU fallback, a tab on
# WebGPU through SwiftShader; log-normal within each class) and runs the rounds
# on a simulated clock. Three runs of the small model from its Dickens
# pre-training, 10 clients training at once, 5 local batches each, client lr 0.5,
# 150 steps of the global model each (settings fixed beforehand, not tuned):
#
# - sync: 10 clients a round, each round waits for its last device;
# - sync-deadline: the same, closed at a 10 s deadline with at least 5 updates
#   (the usual cure for stragglers: their work is dropped);
# - async: FedBuff, a step every 10 updates, each discounted by 1/sqrt(1 + s)
#   for its staleness s, none staler than 4 steps;
# - async-30: the same with 30 clients training at once (FedBuff's advice:
#   more devices in flight than the buffer holds).
#
# Runs go to runs/async/*/ (metrics.jsonl and clock.jsonl in git, checkpoints
# not; a finished run is skipped); the curves to docs/sync-vs-async-*.svg, the
# table to stdout. About 15 minutes on two cores. Usage: bench/sync-vs-async.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q --release -p folio --bin folio
folio=./target/release/folio
steps=150
common=(--population --devices --preset small --max-batches 5
    --client-lr 0.5 --eval-clients 16 --eval-batches 2 --population-eval-every 25
    --rounds "$steps" --seed 1)

run() {
    local name=$1
    shift
    local dir=runs/async/$name
    if [ -f "$dir/clock.jsonl" ] && [ "$(tail -n 1 "$dir/clock.jsonl" | sed 's/.*"round":\([0-9]*\).*/\1/')" = "$steps" ]; then
        echo "$name: done already ($dir)"
        return
    fi
    rm -rf "$dir"
    echo "$name: $*"
    "$folio" simulate "${common[@]}" "$@" --state-dir "$dir" | tail -n 1
}

run sync --clients-per-round 10
run sync-deadline --clients-per-round 10 --deadline-secs 10 --quorum 5
run async --clients-per-round 10 --mode async --buffer 10 --max-staleness 4
run async-30 --clients-per-round 30 --mode async --buffer 10 --max-staleness 4

runs=(runs/async/sync runs/async/sync-deadline runs/async/async runs/async/async-30)
"$folio" plot "${runs[@]}" --by time --out docs/sync-vs-async-time.svg \
    --title "Sync vs async rounds on the same devices: accuracy against simulated time" >/dev/null
"$folio" plot "${runs[@]}" --by compute --out docs/sync-vs-async-compute.svg \
    --title "Sync vs async rounds on the same devices: accuracy against client compute" >/dev/null
for dir in "${runs[@]}"; do
    rm -f "$dir/state.safetensors"
done

python3 - "${runs[@]}" <<'EOF'
import json, sys

print("| run | steps | simulated time | updates taken | refused | characters trained (wasted) | mean staleness | eval accuracy | population accuracy |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for run in sys.argv[1:]:
    metrics = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    clock = [json.loads(line) for line in open(f"{run}/clock.jsonl")]
    last, tick = metrics[-1], clock[-1]
    stale = [m["staleness"] for m in metrics[1:] if m.get("staleness") is not None]
    staleness = f"{sum(stale) / len(stale):.2f}" if stale else "—"
    population = [m for m in metrics if m.get("population_accuracy") is not None][-1]
    print(f"| {run.split('/')[-1]} | {last['round']} | {tick['seconds'] / 60:.1f} min | {tick['updates']:,} | "
          f"{tick['refused']:,} | {tick['chars_trained'] / 1e6:.2f} M ({tick['chars_wasted'] / 1e6:.2f} M) | "
          f"{staleness} | {last['eval_accuracy']:.4f} | {population['population_accuracy']:.4f} |")

# Simulated time each run took to first reach a population accuracy the
# slowest-learning run reached.
firsts = []
for run in sys.argv[1:]:
    metrics = {m["round"]: m for m in map(json.loads, open(f"{run}/metrics.jsonl"))}
    clock = {c["round"]: c for c in map(json.loads, open(f"{run}/clock.jsonl"))}
    points = [(clock[r]["seconds"], clock[r]["chars_trained"], m["population_accuracy"])
              for r, m in sorted(metrics.items()) if m.get("population_accuracy") is not None and r in clock]
    firsts.append((run, points))
target = min(max(p[2] for p in points) for _, points in firsts)
print(f"\nFirst population accuracy >= {target:.4f} (the best the weakest run reached):\n")
print("| run | simulated time | characters trained |")
print("| --- | --- | --- |")
for run, points in firsts:
    seconds, chars, _ = next(p for p in points if p[2] >= target)
    print(f"| {run.split('/')[-1]} | {seconds / 60:.1f} min | {chars / 1e6:.2f} M |")
EOF
