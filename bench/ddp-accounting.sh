#!/usr/bin/env bash
# Distributed DP's accountant (`folio privacy epsilon --skellam-scale`) against
# references computed here in Python, on a grid of sampling rates Q, noise
# multipliers Z, scales C (integer steps in one clip bound) and rounds N, δ = 1e-5,
# one-value updates (d = 1, where the exact divergence can be summed):
#
# - closed form: Agarwal, Kairouz and Liu 2021 (Theorem 3.5) amplified by Zhu
#   and Wang 2019 (Theorem 9), written again from the papers with SciPy: must
#   agree to 10⁻⁶ (the same bound, computed independently);
# - exact: the Rényi divergence of the Poisson-sampled Skellam mechanism itself,
#   summed over its support (pmf e^−μ I_k(μ) from SciPy's Bessel function) for the
#   largest shift a rounded update can make, both neighbouring directions: folio's
#   ε must never be under it (a bound below the truth would be a privacy bug);
# - Gaussian: dp-accounting's Poisson-sampled Gaussian of the same z, the limit
#   of a fine scale.
#
# Prints the table and fails on a violation. Installs dp-accounting (and SciPy)
# into target/dp-venv the first time. Usage: bench/ddp-accounting.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/dp-venv
source bench/venv.sh
ensure_venv "$venv" dp_accounting "dp-accounting==0.6.0"

grid=$(mktemp)
trap 'rm -f "$grid"' EXIT
for q in 1 0.1 0.01; do
    for z in 0.5 1 2; do
        for c in 10 100 10000; do
            for n in 1 100; do
                ours=$(./target/release/folio privacy epsilon --sampling-rate "$q" --noise-multiplier "$z" \
                    --rounds "$n" --delta 1e-5 --distributed-dims 1 --skellam-scale "$c" | awk '{ print $3 }')
                echo "$q $z $c $n $ours"
            done
        done
    done
done >"$grid"

"$venv/bin/python" - "$grid" <<'PY'
import math, sys
import numpy as np
from scipy import special
import dp_accounting as dpa
from absl import logging as absl_logging
from dp_accounting import rdp

# dp-accounting leaves out fractional orders whose series does not converge, and says so each time.
absl_logging.set_verbosity(absl_logging.ERROR)

DELTA, BETA = 1e-5, math.exp(-2.0)
ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]

def rounded_l2(c, d):
    sure = c + math.sqrt(d)
    likely = math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (c + math.sqrt(d) / 2))
    return min(sure, likely)

def skellam_rdp(a, l1, l2, mu):  # Agarwal et al. 2021, Theorem 3.5, integer a
    return a * l2 ** 2 / (2 * mu) + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))

def zhu_wang(a, q, eps):  # Zhu and Wang 2019, Theorem 9, integer a >= 2
    terms = [(a - 1) * math.log1p(-q) + math.log(a * q - q + 1),
             math.log(special.comb(a, 2, exact=True)) + 2 * math.log(q) + (a - 2) * math.log1p(-q) + eps(2)]
    for l in range(3, a + 1):
        terms.append(math.log(3) + special.gammaln(a + 1) - special.gammaln(l + 1) - special.gammaln(a - l + 1)
                     + l * math.log(q) + (a - l) * math.log1p(-q) + (l - 1) * eps(l))
    return special.logsumexp(terms) / (a - 1)

def to_epsilon(rdp_at):  # the conversion folio and dp-accounting use
    best = math.inf
    for a in ORDERS:
        r = rdp_at(max(2, math.ceil(a)))
        if DELTA ** 2 + math.expm1(-r) > 0:
            return 0.0
        if a > 1.01:
            best = min(best, max(0.0, r + math.log1p(-1 / a) - math.log(DELTA * a) / (a - 1)))
    return best

def closed_form(q, z, c, n):
    l2 = rounded_l2(c, 1)
    l1 = l2 * min(1.0, l2)
    mu = (z * c) ** 2
    eps = lambda a: skellam_rdp(a, l1, l2, mu)
    one = lambda a: eps(a) if q == 1 else min(eps(a), zhu_wang(a, q, eps))
    cache = {}
    return to_epsilon(lambda a: n * cache.setdefault(a, one(a)))

def exact(q, z, c, n):
    mu = (z * c) ** 2
    shift = math.floor(rounded_l2(c, 1))
    width = int(shift + 40 * math.sqrt(mu) + 200)
    k = np.arange(-width, width + 1)
    with np.errstate(divide="ignore"):
        log_p = np.log(special.ive(np.abs(k), mu))
        log_s = np.log(special.ive(np.abs(k - shift), mu))
    keep = np.isfinite(log_p) & np.isfinite(log_s)
    log_p, log_s = log_p[keep], log_s[keep]
    log_m = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_s) if q < 1 else log_s
    def one(a):
        forward = special.logsumexp(a * log_m + (1 - a) * log_p) / (a - 1)
        backward = special.logsumexp(a * log_p + (1 - a) * log_m) / (a - 1)
        return max(forward, backward)
    cache = {}
    return to_epsilon(lambda a: n * cache.setdefault(a, one(a)))

def gaussian(q, z, n):
    accountant = rdp.RdpAccountant()
    accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), n)
    return accountant.get_epsilon(DELTA)

print(f"{'Q':>5} {'Z':>4} {'C':>6} {'N':>4} {'folio':>12} {'closed form':>12} {'exact (d=1)':>12} {'Gaussian':>12} {'folio/exact':>11}")
worst_closed, violations, count = 0.0, 0, 0
for line in open(sys.argv[1]):
    q, z, c, n, ours = line.split()
    q, z, c, n, ours = float(q), float(z), float(c), int(n), float(ours)
    closed, truth, gauss = closed_form(q, z, c, n), exact(q, z, c, n), gaussian(q, z, n)
    diff = abs(ours - closed) / max(closed, 1e-12)
    worst_closed = max(worst_closed, diff)
    if ours < truth * (1 - 1e-9):
        violations += 1
    count += 1
    print(f"{q:>5g} {z:>4g} {c:>6g} {n:>4} {ours:>12.6g} {closed:>12.6g} {truth:>12.6g} {gauss:>12.6g} {ours / max(truth, 1e-12):>11.4f}")
print(f"\n{count} points; folio against the closed form: largest relative difference {100 * worst_closed:.2e} %; "
      f"points where folio's ε is under the exact divergence's: {violations}")
sys.exit(worst_closed > 1e-6 or violations > 0)
PY
