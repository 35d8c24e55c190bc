# shellcheck shell=bash
# Helpers shared by up.sh and test.sh. Everything binds 127.0.0.1; every process is started in its
# own process group and stopped by that PID, never by name.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_BIN="$ROOT/.local/venv/bin"
# Logs, env.sh and summaries; another RUN_DIR lets a second stack run from the same checkout.
RUN_DIR="${RUN_DIR:-$ROOT/.local/run}"
export PATH="$VENV_BIN:$PATH"

# need_package COMMAND PACKAGE: installs the Debian package when the command is missing (the
# browser test's Chromium and chromedriver), with sudo when not root; fails saying what to install.
need_package() {
  command -v "$1" >/dev/null && return 0
  command -v apt-get >/dev/null || { log "$1 is required (Debian package $2)"; return 1; }
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  log "installing $2 (for $1)"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
  command -v "$1" >/dev/null || { log "$2 installed but $1 is still missing"; return 1; }
}

log() { printf '\033[1m[%s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# True while the process exists and is not a zombie.
alive() {
  local state
  state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z* ]]
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# start_bg NAME LOGFILE CMD... : runs CMD in a new process group (setsid) with stdout and stderr
# appended to LOGFILE (a file never blocks the writer); sets BG_PID.
start_bg() {
  local name="$1" logfile="$2"
  shift 2
  mkdir -p "$(dirname "$logfile")"
  : >"$logfile"
  setsid "$@" >>"$logfile" 2>&1 </dev/null &
  BG_PID=$!
  log "started $name (pid $BG_PID, log ${logfile#"$ROOT"/})"
}

# stop_group PID NAME : SIGTERM to the process group, SIGKILL after 10 s.
stop_group() {
  local pid="${1:-}" name="${2:-process}"
  [[ -n "$pid" ]] || return 0
  if alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "$name did not stop in 10 s; killing its process group"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# start_moto PORT LOGFILE : PORT 0 picks a free port. moto prints the port it bound only on
# stderr ("Running on http://127.0.0.1:PORT"), so it is read from the log. Sets MOTO_PID and
# MOTO_PORT once the emulator answers.
start_moto() {
  local port="$1" logfile="$2" i
  start_bg moto "$logfile" "$VENV_BIN/moto_server" -H 127.0.0.1 -p "$port"
  MOTO_PID=$BG_PID
  MOTO_PORT=""
  for i in $(seq 1 300); do
    if ! alive "$MOTO_PID"; then
      log "moto exited during start-up:"
      cat "$logfile" >&2
      return 1
    fi
    if [[ -z "$MOTO_PORT" ]]; then
      MOTO_PORT="$(sed -n 's#.*Running on http://127\.0\.0\.1:\([0-9][0-9]*\).*#\1#p' "$logfile" | head -n 1)"
    fi
    if [[ -n "$MOTO_PORT" ]] && curl -sf -o /dev/null "http://127.0.0.1:$MOTO_PORT/moto-api/"; then
      return 0
    fi
    sleep 0.1
  done
  log "moto did not answer within 30 s:"
  cat "$logfile" >&2
  return 1
}

# free_port FROM : the first port from FROM on (100 tried) that nothing on 127.0.0.1 answers.
free_port() {
  local port
  for port in $(seq "$1" $(($1 + 99))); do
    if ! port_in_use "$port"; then
      echo "$port"
      return 0
    fi
  done
  log "no free port in $1..$(($1 + 99))"
  return 1
}

# start_dynalite PORT LOGFILE : dynalite, in memory, for the source tables (see the README: why
# dynalite for the source and moto for the metadata). Tables are ACTIVE at once. Sets
# DYNALITE_PID once it answers. DYNALITE_HEAP_MB (8192) bounds node's heap: dynalite holds about
# 2.6 KB per seeded item (the item and its by_created_at copy; 2.8 GB resident for ROWS=1000000
# TENANTS=acme, 1.1M items), so two tenants of a million orders need about 6 GB.
start_dynalite() {
  local port="$1" logfile="$2" i
  start_bg dynalite "$logfile" node "--max-old-space-size=${DYNALITE_HEAP_MB:-8192}" \
    "$ROOT/.local/node/node_modules/dynalite/cli.js" --host 127.0.0.1 --port "$port" \
    --createTableMs 0 --deleteTableMs 0 --updateTableMs 0
  DYNALITE_PID=$BG_PID
  for i in $(seq 1 300); do
    if ! alive "$DYNALITE_PID"; then
      log "dynalite exited during start-up:"
      cat "$logfile" >&2
      return 1
    fi
    # Any answer will do: an unsigned request gets a 400 naming the missing signature.
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port/" || true)" != 000 ]]; then
      return 0
    fi
    sleep 0.1
  done
  log "dynalite did not answer within 30 s:"
  cat "$logfile" >&2
  return 1
}

# Environment for the SDKs against the emulator on MOTO_PORT.
export_aws_env() {
  export AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT"
  export AWS_ACCESS_KEY_ID=test
  export AWS_SECRET_ACCESS_KEY=test
  export AWS_REGION=us-east-1
  export AWS_DEFAULT_REGION=us-east-1
  export AWS_EC2_METADATA_DISABLED=true
}

# own_moto NAME : a moto on a free port for this script alone, stopped by PID however the script
# ends (sets the EXIT/INT/TERM traps), with the SDK environment exported. Sets MOTO_LOG.
own_moto() {
  "$ROOT/infra/scripts/bootstrap.sh"
  MOTO_PID=""
  trap 'stop_group "$MOTO_PID" moto' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mkdir -p "$RUN_DIR"
  MOTO_LOG="$(mktemp "$RUN_DIR/moto-$1.XXXXXX.log")"
  start_moto 0 "$MOTO_LOG"
  export_aws_env
  log "moto on $AWS_ENDPOINT_URL"
}
