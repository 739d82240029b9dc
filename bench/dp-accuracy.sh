#!/usr/bin/env bash
# The price of differential privacy on federated Shakespeare: population
# accuracy of the medium model (from the Dickens model) against ε, for three
# noise multipliers and the non-private baseline, all at the same rounds and
# clients per round.
#
# 1. Tuning, on the validation split only (`--validation`: each client's last
#    eighth of training speeches held out, the test split never loaded): the
#    clip bound S among 0.1, 0.3 and 1.0 at the middle noise multiplier.
# 2. The figures, on the test split: the baseline (FedAvg, the same fixed clip
#    and uniform weights, no noise) and DP-FedAvg at each noise multiplier, with
#    the S chosen in 1.
#
# Runs live in runs/dp-*/ (metrics.jsonl in git, checkpoints not); a run that
# stopped resumes where it stopped, a finished one is skipped. Takes about an
# hour on two cores. Usage: bench/dp-accuracy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

clients=50
tune_rounds=20
rounds=40
noise=(0.1 0.3 1.0)
tune_noise=0.3
bounds=(0.1 0.3 1.0)

cargo build -q --release -p folio --bin folio
folio=./target/release/folio
common=(--population --preset medium --init models/dickens-medium.safetensors
    --clients-per-round "$clients" --max-batches 0 --client-lr 0.3
    --eval-clients 16 --eval-batches 2)

# The last population accuracy and ε of a run folder.
last() {
    python3 - "$1/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
acc = [r["population_accuracy"] for r in rows if r.get("population_accuracy") is not None]
eps = rows[-1].get("epsilon")
print(rows[-1]["round"], f"{acc[-1]:.4f}", "-" if eps is None else f"{eps:.3g}")
PY
}

# Runs `folio simulate` into runs/NAME until ROUNDS are committed.
run() {
    local name="$1" rounds="$2"
    shift 2
    local dir="runs/$name"
    if [[ -f "$dir/metrics.jsonl" ]] && [[ "$(last "$dir" | cut -d' ' -f1)" -ge "$rounds" ]]; then
        echo "==> $name: done" >&2
        return
    fi
    echo "==> $name: $rounds rounds" >&2
    "$folio" simulate "${common[@]}" --rounds "$rounds" --state-dir "$dir" "$@" >&2
}

echo "== tuning the clip bound on the validation split (z = $tune_noise)" >&2
best_bound="" best_accuracy=0
for bound in "${bounds[@]}"; do
    name="dp-tune-z$tune_noise-s$bound"
    run "$name" "$tune_rounds" --validation --population-eval-every "$tune_rounds" \
        --strategy dp-fedavg --noise-multiplier "$tune_noise" --clip-bound "$bound"
    read -r _ accuracy _ < <(last "runs/$name")
    echo "S = $bound: validation population accuracy $accuracy" >&2
    if python3 -c "import sys; sys.exit(not $accuracy > $best_accuracy)"; then
        best_bound=$bound best_accuracy=$accuracy
    fi
done
echo "== S = $best_bound (validation accuracy $best_accuracy)" >&2

run dp-baseline "$rounds" --population-eval-every 20 \
    --strategy fedavg --clip fixed --clip-bound "$best_bound" --uniform
for z in "${noise[@]}"; do
    run "dp-z$z" "$rounds" --population-eval-every 20 \
        --strategy dp-fedavg --noise-multiplier "$z" --clip-bound "$best_bound"
done

echo
echo "$rounds rounds of $clients clients (of 1,103; DP: Poisson sampling, q = $clients/1103), clip bound $best_bound, δ = 1/1103^1.1"
echo
echo "| run | noise multiplier z | ε | population test accuracy |"
echo "| --- | --- | --- | --- |"
read -r _ accuracy _ < <(last runs/dp-baseline)
echo "| non-private baseline | 0 | ∞ | $accuracy |"
for z in "${noise[@]}"; do
    read -r _ accuracy epsilon < <(last "runs/dp-z$z")
    echo "| DP-FedAvg | $z | $epsilon | $accuracy |"
done
