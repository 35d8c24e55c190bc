#!/usr/bin/env bash
# make up: the quick start. Installs the tools, builds, starts the AWS emulator (moto) and the
# source tables' own (dynalite), provisions the stack from template.yaml, seeds demo data, serves
# the functions with `cargo lambda watch`, runs the bridge (SQS trigger + schedule) and a real
# export through the API, printing rows/s of each phase. Then keeps running until Ctrl-C; with
# UP_EXIT=1 it stops after the demo (CI). Everything it started is stopped by PID.
#
# Knobs: ROWS (orders per tenant, 20000), TENANTS (acme,globex), FORMATS (the demo's,
# csv,xlsx,csv.gz; csv first when given, the others are compared with it), STACK (export-cache),
# MOTO_PORT (4566; a free port when taken), DYNALITE_PORT (4567; the next free one when taken),
# SOURCE_EMULATOR (dynalite; moto puts the source tables on moto too, as before: ~700 rows/s),
# DYNALITE_HEAP_MB (node's heap for dynalite, 8192), SCHEDULE_SECS (warmer period, 900),
# LOCAL_JWT_SECRET (dev secret), WATCH_TIMEOUT (seconds to wait for the functions, 1200),
# WATCH_PORT (the API's cargo lambda watch, 9000), WORKER_WATCH_PORT (the worker's own watch,
# run and restarted by the bridge, WATCH_PORT+1). Distinct ports, STACK names and RUN_DIRs (logs
# and env.sh, .local/run) let several local stacks run side by side.
# WATCH_RELOAD (1; 0 when UP_EXIT=1): whether the watches rebuild and restart the functions when
# files change. A run that only demonstrates (CI) does not want a restart mid-export.
# KILL_WORKER_CHECK=csv,xlsx,csv.gz: after the demo, export those formats for a tenant of the
# check's own (CRASH_ROWS orders, 100000: enough to still be running when killed), then again,
# kill -9 the worker mid-export and check each job still finishes with the same file (about a
# minute each: the killed run's job lease has to expire).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

STACK="${STACK:-export-cache}"
ROWS="${ROWS:-20000}"
TENANTS="${TENANTS:-acme,globex}"
SCHEDULE_SECS="${SCHEDULE_SECS:-900}"
WATCH_TIMEOUT="${WATCH_TIMEOUT:-1200}"
UP_EXIT="${UP_EXIT:-0}"
WATCH_PORT="${WATCH_PORT:-9000}"
WORKER_WATCH_PORT="${WORKER_WATCH_PORT:-$((WATCH_PORT + 1))}"
WATCH_URL="http://127.0.0.1:$WATCH_PORT"
API="$WATCH_URL/lambda-url/export-api"
export LOCAL_JWT_SECRET="${LOCAL_JWT_SECRET:-export-cache-local-dev-secret-not-for-production}"
DEVSTACK="$ROOT/target/debug/devstack"

MOTO_PID="" DYNALITE_PID="" WATCH_PID="" BRIDGE_PID=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n "$BRIDGE_PID$WATCH_PID$MOTO_PID$DYNALITE_PID" ]]; then
    log "stopping the local stack"
  fi
  stop_group "$BRIDGE_PID" bridge
  stop_group "$WATCH_PID" "cargo lambda watch"
  stop_group "$DYNALITE_PID" dynalite
  stop_group "$MOTO_PID" moto
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_logs() {
  local f
  for f in "$RUN_DIR"/watch.log "$RUN_DIR"/worker-watch.log "$RUN_DIR"/bridge.log "$RUN_DIR"/dynalite.log; do
    [[ -s "$f" ]] || continue
    printf '\n--- last lines of %s ---\n' "${f#"$ROOT"/}" >&2
    tail -n 30 "$f" >&2
  done
}

log "bootstrapping tools"
"$ROOT/infra/scripts/bootstrap.sh"

for port in "$WATCH_PORT" "$WORKER_WATCH_PORT"; do
  if port_in_use "$port"; then
    log "port $port on 127.0.0.1 is taken (another 'make up' or 'cargo lambda watch'?); stop it first or set WATCH_PORT/WORKER_WATCH_PORT"
    exit 1
  fi
done

log "building the workspace (debug)"
cargo build --workspace --bins

moto_port="${MOTO_PORT:-4566}"
if port_in_use "$moto_port"; then
  log "port $moto_port is taken; moto will pick a free port"
  moto_port=0
fi
mkdir -p "$RUN_DIR"
start_moto "$moto_port" "$RUN_DIR/moto.log"
export_aws_env
log "AWS emulator on $AWS_ENDPOINT_URL"

# The source tables are read-heavy and need no transactions, TTL or streams: dynalite serves
# their Queries some 20 times faster than moto (README, "why dynalite for the source").
SOURCE_EMULATOR="${SOURCE_EMULATOR:-dynalite}"
case "$SOURCE_EMULATOR" in
  dynalite)
    dynalite_port="${DYNALITE_PORT:-4567}"
    if port_in_use "$dynalite_port"; then
      dynalite_port="$(free_port $((dynalite_port + 1)))"
      log "port ${DYNALITE_PORT:-4567} is taken; dynalite takes $dynalite_port"
    fi
    : >"$RUN_DIR/dynalite.log"
    start_dynalite "$dynalite_port" "$RUN_DIR/dynalite.log"
    export SOURCE_ENDPOINT_URL="http://127.0.0.1:$dynalite_port"
    log "source tables' emulator (dynalite) on $SOURCE_ENDPOINT_URL"
    ;;
  moto)
    unset SOURCE_ENDPOINT_URL
    log "source tables on moto as well (SOURCE_EMULATOR=moto)"
    ;;
  *)
    log "SOURCE_EMULATOR is dynalite or moto, not $SOURCE_EMULATOR"
    exit 1
    ;;
esac

log "provisioning stack $STACK from template.yaml"
"$DEVSTACK" provision --stack "$STACK"
"$DEVSTACK" env --stack "$STACK" --schedule-secs "$SCHEDULE_SECS" >"$RUN_DIR/env.sh"
# shellcheck disable=SC1091
source "$RUN_DIR/env.sh"

log "seeding $ROWS orders per tenant ($TENANTS)"
"$DEVSTACK" seed --stack "$STACK" --rows "$ROWS" --tenants "$TENANTS" | tee "$RUN_DIR/seed.txt"

# The crash check must find its job still running: from the fast source a few thousand rows are
# exported in well under a second, so it exports a tenant of its own with more rows.
CRASH_TENANT=crashcheck
CRASH_ROWS="${CRASH_ROWS:-100000}"
CRASH_DIR="$ROOT/target/demo/crash-check"
if [[ -n "${KILL_WORKER_CHECK:-}" ]]; then
  log "seeding $CRASH_ROWS orders for tenant $CRASH_TENANT (the crash check's own)"
  "$DEVSTACK" seed --stack "$STACK" --rows "$CRASH_ROWS" --tenants "$CRASH_TENANT"
fi

if [[ "${WATCH_RELOAD:-$([[ "$UP_EXIT" == 1 ]] && echo 0 || echo 1)}" == 1 ]]; then
  reload_flags=() worker_reload=true
else
  reload_flags=(--ignore-changes) worker_reload=false
fi
start_bg "cargo lambda watch" "$RUN_DIR/watch.log" \
  cargo lambda watch -A 127.0.0.1 -P "$WATCH_PORT" "${reload_flags[@]}"
WATCH_PID=$BG_PID

# The bridge runs the worker under a cargo lambda watch of its own on WORKER_WATCH_PORT and
# restarts it when the worker dies or hangs (cargo lambda watch never starts a dead function
# again); the API's watch above is never touched by that.
: >"$RUN_DIR/worker-watch.log"
start_bg bridge "$RUN_DIR/bridge.log" \
  "$DEVSTACK" bridge --stack "$STACK" --watch "$WATCH_URL" --schedule-secs "$SCHEDULE_SECS" \
  --worker-port "$WORKER_WATCH_PORT" --worker-log "$RUN_DIR/worker-watch.log" \
  --worker-reload "$worker_reload"
BRIDGE_PID=$BG_PID

log "waiting for the API at $API/health (the first call compiles export-api; log: ${RUN_DIR#"$ROOT"/}/watch.log)"
deadline=$((SECONDS + WATCH_TIMEOUT))
until [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 900 "$API/health" || true)" == 200 ]]; do
  if ! alive "$WATCH_PID"; then
    log "cargo lambda watch exited"
    show_logs
    exit 1
  fi
  if ((SECONDS > deadline)); then
    log "the API did not answer 200 on /health within ${WATCH_TIMEOUT} s"
    show_logs
    exit 1
  fi
  sleep 1
done
log "API is up"

if ! "$DEVSTACK" demo --api "$API" --format "${FORMATS:-csv,xlsx,csv.gz}"; then
  log "the demo failed"
  show_logs
  exit 1
fi
# The seed's rate next to the demo's table (export and download rows/s per format).
printf '  seed    %s (source tables on %s)\n\n' "$(tail -n 1 "$RUN_DIR/seed.txt")" "$SOURCE_EMULATOR"

if [[ -n "${KILL_WORKER_CHECK:-}" ]]; then
  log "exporting tenant $CRASH_TENANT's $CRASH_ROWS orders uninterrupted: the files a killed export must end with"
  if ! "$DEVSTACK" demo --api "$API" --tenant "$CRASH_TENANT" --format "$KILL_WORKER_CHECK" --out-dir "$CRASH_DIR" >"$RUN_DIR/crash-reference.log"; then
    log "the crash check's reference export failed ($RUN_DIR/crash-reference.log)"
    tail -n 30 "$RUN_DIR/crash-reference.log" >&2
    show_logs
    exit 1
  fi
  log "killing the worker mid-export ($KILL_WORKER_CHECK); the bridge restarts it and the jobs go on"
  if ! "$DEVSTACK" crash-check --api "$API" --worker-port "$WORKER_WATCH_PORT" --format "$KILL_WORKER_CHECK" \
    --tenant "$CRASH_TENANT" --out-dir "$CRASH_DIR"; then
    log "a job did not survive its worker being killed"
    show_logs
    exit 1
  fi
fi

if [[ "$UP_EXIT" == 1 ]]; then
  log "UP_EXIT=1: stopping after the demo"
  exit 0
fi

RUN_REL="${RUN_DIR#"$ROOT"/}"
# The page reads the token from the URL's fragment, which the browser never sends to a server.
PAGE_TOKEN=$("$DEVSTACK" token --tenant "${TENANTS%%,*}")
cat >&2 <<INFO

The local stack is running:
  page       $API/#token=$PAGE_TOKEN
  API        $API
  emulator   $AWS_ENDPOINT_URL   (stack $STACK)
  source     ${SOURCE_ENDPOINT_URL:-$AWS_ENDPOINT_URL}   (orders and customers, on $SOURCE_EMULATOR)
  worker     http://127.0.0.1:$WORKER_WATCH_PORT (the bridge's own watch, restarted if the worker dies)
  logs       $RUN_REL/watch.log  $RUN_REL/worker-watch.log  $RUN_REL/bridge.log  $RUN_REL/moto.log  $RUN_REL/dynalite.log
  shell      source $RUN_REL/env.sh && target/debug/devstack token
Press Ctrl-C to stop everything.
INFO

status=0
wait -n "$MOTO_PID" $DYNALITE_PID "$WATCH_PID" "$BRIDGE_PID" || status=$?
log "a component exited (status $status); stopping"
show_logs
exit 1
