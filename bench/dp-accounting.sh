#!/usr/bin/env bash
# folio's privacy accountant (`folio privacy epsilon`) against Google's
# dp-accounting (PyPI), on a grid of sampling rates Q, noise multipliers Z, rounds
# N and δ: both print ε for N rounds of the Poisson-sampled Gaussian mechanism
# (Rényi DP, the same orders, the tight conversion to (ε, δ)). Prints the table and
# the largest relative difference; fails if any exceeds 1 %. Installs
# dp-accounting into target/dp-venv the first time; the README's main commands
# never do. Usage: bench/dp-accounting.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/dp-venv
source bench/venv.sh
ensure_venv "$venv" dp_accounting "dp-accounting==0.6.0"

# The grid: generic points, and folio's own (10 or 100 of 1,103 Shakespeare
# clients a round).
grid=$(mktemp)
trap 'rm -f "$grid"' EXIT
for q in 0.001 0.01 0.1 1 0.009066183136899365 0.09066183136899365; do
    for z in 0.5 1 2 5; do
        for n in 100 1000 10000; do
            for delta in 1e-5 1e-7; do
                echo "$q $z $n $delta"
            done
        done
    done
done >"$grid"

"$venv/bin/python" - "$grid" <<'PY' | while read -r q z n delta theirs; do
import sys
import dp_accounting as dpa
from dp_accounting import rdp
for line in open(sys.argv[1]):
    q, z, n, delta = line.split()
    accountant = rdp.RdpAccountant()
    event = dpa.PoissonSampledDpEvent(float(q), dpa.GaussianDpEvent(float(z)))
    accountant.compose(event, int(n))
    print(q, z, n, delta, repr(float(accountant.get_epsilon(float(delta)))))
PY
    ours=$(./target/release/folio privacy epsilon --sampling-rate "$q" --noise-multiplier "$z" \
        --rounds "$n" --delta "$delta" | awk '{ print $3 }')
    echo "$q $z $n $delta $theirs $ours"
done | awk '
    BEGIN { printf "%-22s %5s %6s %6s %14s %14s %9s\n", "Q", "Z", "N", "delta", "dp-accounting", "folio", "rel diff"; worst = 0 }
    {
        d = ($5 == $6) ? 0 : ($6 - $5) / ($5 > 0 ? $5 : 1); if (d < 0) d = -d
        if (d > worst) { worst = d; at = $1 " " $2 " " $3 " " $4 }
        printf "%-22s %5s %6s %6s %14.6g %14.6g %8.4f%%\n", $1, $2, $3, $4, $5, $6, 100 * d
        count++
    }
    END {
        printf "\n%d points; largest relative difference %.4f%% (Q Z N delta = %s)\n", count, 100 * worst, at
        exit (worst > 0.01)
    }'
