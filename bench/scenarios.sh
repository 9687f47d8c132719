#!/usr/bin/env bash
# One command per benchmark scenario of BENCHMARKS.md:  bench/scenarios.sh NAME   (or: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
P="$PY bench/pipeline_bench.py"
run() {
  case "$1" in
    1-sum)        $P --scenario "1 correct limits, sum" --charge-rule sum ;;
    1-max)        $P --scenario "1 correct limits, max" --charge-rule max ;;
    1-no-ra)      $P --scenario "1 correct limits, no Retry-After" --no-retry-after ;;
    1-equal-burst) $P --scenario "1 correct limits, server burst 5 s = ours" --sim-burst-seconds 5 ;;
    2-sum)        $P --scenario "2 limits 10% high, sum" --configured-factor 1.1 --charge-rule sum ;;
    2-max)        $P --scenario "2 limits 10% high, max" --configured-factor 1.1 --charge-rule max ;;
    2-no-ra)      $P --scenario "2 limits 10% high, no Retry-After" --configured-factor 1.1 --no-retry-after ;;
    3-learned)    $P --scenario "3 limits not configured (3 min)" --unconfigured --jobs 4000 --tpm 250000 ;;
    3-learned-max)   $P --scenario "3 limits not configured, max" --unconfigured --jobs 4000 --tpm 250000 --charge-rule max ;;
    3-learned-no-ra) $P --scenario "3 limits not configured, no Retry-After" --unconfigured --jobs 4000 --tpm 250000 --no-retry-after ;;
    4-scale-out)  $P --scenario "4 four workers" --workers 4 ;;
    4-scale-out-max)   $P --scenario "4 four workers, max" --workers 4 --charge-rule max ;;
    4-scale-out-no-ra) $P --scenario "4 four workers, no Retry-After" --workers 4 --no-retry-after ;;
    4-naive)      $PY bench/naive_baseline.py --processes 4 ;;
    5-overhead)   $P --scenario "5 overhead, no latency" --latency-ms 0 --rpm 10000000 --tpm 10000000000 --jobs 20000 ;;
    5-limiter)    $PY bench/limiter_bench.py ;;
    6-long)       $P --scenario "6 10 s latency, 500 in flight" --latency-ms 10000 --rpm 3000 --tpm 100000000 --jobs 4000 ;;
    7-big)        $PY bench/big_batch.py --jobs 100000 ;;
    chaos)        $PY bench/chaos_bench.py --jobs 5000 --fault-rate 0.05 --redis-kills 3 ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}
if [ "${1:-}" = "all" ]; then
  for s in 1-sum 1-max 1-no-ra 1-equal-burst 2-sum 2-max 2-no-ra 3-learned 3-learned-max 3-learned-no-ra 4-scale-out \
           4-scale-out-max 4-scale-out-no-ra 4-naive 5-overhead 5-limiter 6-long 7-big chaos; do
    run "$s"
  done
else
  run "${1:?scenario name, or all}"
fi
