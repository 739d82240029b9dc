#!/usr/bin/env bash
# Training chars/s of folio (flex, native) and of TensorFlow/Keras on the CPU, same
# model, same step, same threads, measured in turns in one run, with the ratio.
# Installs TensorFlow (tensorflow-cpu from PyPI) into target/keras-venv the first
# time; the README's main commands never do. Usage:
#   bench/keras-vs-folio.sh [--presets small,seed] [--batch 8,64] [--steps 3] [--rounds 2]
set -euo pipefail
cd "$(dirname "$0")/.."

presets=small,seed batch=8,64 steps=3 rounds=2
while [ $# -gt 0 ]; do
    case "$1" in
        --presets) presets="$2"; shift 2 ;;
        --batch) batch="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        *) echo "unknown option $1 (see the comment at the top of $0)" >&2; exit 2 ;;
    esac
done

venv=target/keras-venv
source bench/venv.sh
ensure_venv "$venv" tensorflow "tensorflow-cpu==2.17.0" # ≈ 600 MB

threads=$(nproc)
results=$(mktemp)
trap 'rm -f "$results"' EXIT
# Turns, not one block each: a shared machine's noise falls on both alike.
for round in $(seq "$rounds"); do
    echo "==> round $round of $rounds: folio" >&2
    RAYON_NUM_THREADS=$threads ./target/release/folio bench train --presets "$presets" \
        --batch "$batch" --steps "$steps" | awk 'NR > 1 { print "folio", $1, $2, $6 }' >>"$results"
    echo "==> round $round of $rounds: keras" >&2
    TF_CPP_MIN_LOG_LEVEL=2 "$venv/bin/python" bench/keras_train.py --presets "$presets" \
        --batch "$batch" --steps "$steps" --threads "$threads" | awk '{ print "keras", $1, $2, $3 }' >>"$results"
done

echo "training chars/s, B x T = batch x 100, $steps timed steps after a warm-up, $threads threads, best of $rounds rounds"
printf '%-7s %5s %12s %12s %8s\n' preset batch folio keras ratio
awk '{ key = $2 " " $3; if ($4 > best[$1, key]) best[$1, key] = $4; keys[key] = 1 }
     END { for (k in keys) { split(k, p, " ");
           printf "%-7s %5s %12.0f %12.0f %8.2f\n", p[1], p[2], best["folio", k], best["keras", k],
                  best["folio", k] / best["keras", k] } }' "$results" | sort -k1,1r -k2,2n
