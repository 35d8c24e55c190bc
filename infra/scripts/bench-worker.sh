#!/usr/bin/env bash
# make bench-worker: the worker bench (shared/benches/worker.rs) against a moto server of its own
# on a free port, stopped by PID afterwards. BENCH_ROWS (1000000; a comma list) and BENCH_CASES
# (format/decoder: csv/sdk,csv/fast,xlsx/sdk,xlsx/fast) pick the runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
own_moto bench
IFS=',' read -r -a rows <<<"${BENCH_ROWS:-1000000}"
cargo bench -p shared --bench worker -- "${rows[@]}"
