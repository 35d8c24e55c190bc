#!/usr/bin/env bash
# make bench-worker: the worker bench (shared/benches/worker.rs) against a moto server of its own
# on a free port, stopped by PID afterwards. BENCH_ROWS (1000000; a comma list) and BENCH_CASES
# (csv,xlsx) pick the runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
"$ROOT/infra/scripts/bootstrap.sh"

MOTO_PID=""
trap 'stop_group "$MOTO_PID" moto' EXIT
mkdir -p "$RUN_DIR"
start_moto 0 "$RUN_DIR/bench-moto.log"
export_aws_env
IFS=',' read -r -a rows <<<"${BENCH_ROWS:-1000000}"
cargo bench -p shared --bench worker -- "${rows[@]}"
