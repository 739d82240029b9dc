#!/usr/bin/env bash
# How ε falls with the size of a deployment, by the accountant alone: the same
# 40 rounds, and the same noise on the round's average update as the measured
# runs of bench/dp-accuracy.sh (z·S over 50 clients a round, for z = 0.1, 0.3,
# 1.0), but a cohort of 1 % of a population of N clients (at least 50): the noise
# multiplier grows with the cohort (z × C / 50), the sampling rate is C / N, and
# δ = 1 / N^1.1. Usage: bench/dp-deployment.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p folio --bin folio
rounds=40
echo "| clients N | a round C (q = C/N) | δ | ε, noise as z = 0.1 at 50 | as z = 0.3 at 50 | as z = 1.0 at 50 |"
echo "| --- | --- | --- | --- | --- | --- |"
for n in 1103 10000 100000 1000000 10000000; do
    c=$(( n / 100 > 50 ? n / 100 : 50 ))
    q=$(python3 -c "print($c / $n)")
    delta=$(python3 -c "print(f'{1 / $n ** 1.1:.3g}')")
    row="| $n | $c (q = $(python3 -c "print(f'{$q:.3g}')")) | $delta |"
    for z in 0.1 0.3 1.0; do
        scaled=$(python3 -c "print($z * $c / 50)")
        epsilon=$(./target/release/folio privacy epsilon --sampling-rate "$q" \
            --noise-multiplier "$scaled" --rounds "$rounds" --delta "$delta" | awk '{ print $3 }')
        row+=" $(python3 -c "print(f'{$epsilon:.3g}')") (z = $scaled) |"
    done
    echo "$row"
done
