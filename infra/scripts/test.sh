#!/usr/bin/env bash
# make test: cfn-lint on the template and the workspace tests, against a moto server started on a
# free port for this run and stopped (by PID) however the run ends.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

own_moto test
# The browser test (tests/browser.rs) drives Debian's Chromium through chromedriver.
need_package chromium chromium
need_package chromedriver chromium-driver

status=0
log "cfn-lint template.yaml"
cfn-lint template.yaml || status=$?
log "cargo test --workspace"
SUMMARY_LOG="$RUN_DIR/test-output.log"
cargo test --workspace "$@" 2>&1 | tee "$SUMMARY_LOG" || status=$?
# One closing line for the whole run, whatever the last test binary printed.
read -r passed failed < <(awk '/^test result:/ {p += $4; f += $6} END {print p+0, f+0}' "$SUMMARY_LOG")
printf 'tests: %s passed, %s failed\n' "$passed" "$failed" | tee "$RUN_DIR/test-summary.txt"

if [[ $status -eq 0 ]]; then
  rm -f "$MOTO_LOG"
  log "all tests passed"
else
  log "tests failed (status $status); emulator log: ${MOTO_LOG#"$ROOT"/}"
fi
exit "$status"
