#!/usr/bin/env bash
# Distributed DP against central DP at the same ε on federated Shakespeare: for
# each central run of bench/dp-accuracy.sh (z = 0.1, 0.3, 1.0; run it first), the
# noise multiplier at which the devices' Skellam noise costs no more ε (the
# accountant, by bisection), then the same 40 rounds of ≈ 50 clients with secure
# aggregation and the devices adding the noise. Same clip bound (tuned on the
# validation split by bench/dp-accuracy.sh), the test split once each.
#
# Runs live in runs/ddp-*/ (metrics.jsonl in git, checkpoints not); a run that
# stopped resumes, a finished one is skipped. About 15 min a run on two cores.
# Usage: bench/ddp-accuracy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

clients=50 rounds=40 population=1103 bound=0.3 params=937430
central=(0.1 0.3 1.0)

cargo build -q --release -p folio --bin folio
folio=./target/release/folio
delta=$(python3 -c "print(1 / $population ** 1.1)")
q=$(python3 -c "print($clients / $population)")
common=(--population --preset medium --init models/dickens-medium.safetensors
    --clients-per-round "$clients" --max-batches 0 --client-lr 0.3
    --eval-clients 16 --eval-batches 2 --clip-bound "$bound" --strategy dp-fedavg
    --population-eval-every 20 --secagg-step-secs 3600)
# (The simulator trains every client before their secure steps: a step must
# outwait a round of training.)

# Round, population accuracy at rounds 20 and 40, and ε of a run folder.
summary() {
    python3 - "$1/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
acc = {r["round"]: r["population_accuracy"] for r in rows if r.get("population_accuracy") is not None}
eps = rows[-1].get("epsilon")
rounds = [r for r in rows if r["round"] > 0]
updates = sum(r["clients"] for r in rounds)
per_update = sum(r["bytes_up"] for r in rounds if r["clients"]) / max(updates, 1)
empty = sum(1 for r in rounds if not r["clients"])
print(rows[-1]["round"], f"{acc.get(20, float('nan')):.4f}", f"{acc.get(40, float('nan')):.4f}",
      "-" if eps is None else f"{eps:.3g}", f"{per_update:,.0f}", updates, empty)
PY
}

# ε of 40 rounds of the devices' noise at multiplier $1.
ddp_epsilon() {
    "$folio" privacy epsilon --sampling-rate "$q" --noise-multiplier "$1" --rounds "$rounds" \
        --delta "$delta" --distributed-dims "$params" --population "$population" | awk '{ print $3 }'
}

# The smallest z (to 0.1 %) whose distributed ε is at most $1.
matching_z() {
    local target="$1" low=0.01 high=100 mid
    for _ in $(seq 60); do
        mid=$(python3 -c "print(($low * $high) ** 0.5)")
        if python3 -c "import sys; sys.exit(not $(ddp_epsilon "$mid") <= $target)"; then
            high=$mid
        else
            low=$mid
        fi
        python3 -c "import sys; sys.exit(not $high / $low < 1.001)" && break
    done
    echo "$high"
}

for z in "${central[@]}"; do
    [[ -f "runs/dp-z$z/metrics.jsonl" ]] || { echo "runs/dp-z$z is missing: run bench/dp-accuracy.sh first" >&2; exit 1; }
    read -r _ _ _ epsilon _ _ _ < <(summary "runs/dp-z$z")
    exact=$(python3 - "runs/dp-z$z/metrics.jsonl" <<'PY'
import json, sys
print(json.loads(open(sys.argv[1]).readlines()[-1])["epsilon"])
PY
)
    zd=$(matching_z "$exact")
    echo "==> central z = $z: ε = $epsilon; distributed at the same ε: z = $zd" >&2
    dir="runs/ddp-z$z"
    if [[ -f "$dir/metrics.jsonl" ]] && [[ "$(summary "$dir" | cut -d' ' -f1)" -ge "$rounds" ]]; then
        echo "==> $dir: done" >&2
    else
        "$folio" simulate "${common[@]}" --rounds "$rounds" --state-dir "$dir" \
            --noise-multiplier "$zd" --secure-aggregation --distributed-dp >&2
    fi
    echo "$z $zd"
done >target/ddp-matched.txt

echo
echo "$rounds rounds of ≈ $clients clients (Poisson, q = $clients/$population), S = $bound, δ = 1/$population^1.1; distributed: 32-bit secure sum, noise planned for 80 % of the expected clients"
echo
echo "| run | z | ε | population test accuracy, round 20 | round 40 | bits a coordinate up | bytes up an update | client updates | rounds unmasked of nothing |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
while read -r z zd; do
    read -r _ a20 a40 eps bytes updates empty < <(summary "runs/dp-z$z")
    echo "| central (server's Gaussian) | $z | $eps | $a20 | $a40 | 32 (f32) | $bytes | $updates | - |"
    read -r _ a20 a40 eps bytes updates empty < <(summary "runs/ddp-z$z")
    echo "| distributed (devices' Skellam) | $(printf %.4g "$zd") | $eps | $a20 | $a40 | 32 (Z/2³²) | $bytes | $updates | $empty |"
done <target/ddp-matched.txt
