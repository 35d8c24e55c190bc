#!/usr/bin/env bash
# Installs the project's tools into .local (gitignored), at pinned versions: the Python tools
# into .local/venv (the AWS emulator moto, cargo-lambda, cfn-lint, and the readers CI checks files
# with) and dynalite, the source tables' emulator, into .local/node (npm ci from infra/dynalite's
# lockfile). Idempotent; returns at once when both stamps match the pins.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# dynalite (pure JavaScript, in memory through memory-level): every package version is pinned by
# infra/dynalite/package-lock.json. --ignore-scripts skips the native build of the LevelDB
# backend, which only an on-disk store (--path) would load.
NODE_DIR="$ROOT/.local/node"
NODE_STAMP="$NODE_DIR/.bootstrap-stamp"
DYNALITE_SPEC="$ROOT/infra/dynalite"
install_dynalite() {
  local want
  want="$(cat "$DYNALITE_SPEC/package.json" "$DYNALITE_SPEC/package-lock.json" | cksum)"
  if [[ -f "$NODE_STAMP" && "$(cat "$NODE_STAMP")" == "$want" && -f "$NODE_DIR/node_modules/dynalite/cli.js" ]]; then
    return 0
  fi
  command -v node >/dev/null && command -v npm >/dev/null || {
    echo "bootstrap: node and npm are required for dynalite, the local source tables' emulator (Debian: apt-get install nodejs npm)" >&2
    exit 1
  }
  local major
  major="$(node -p 'process.versions.node.split(".")[0]')"
  if ((major < 20)); then
    echo "bootstrap: dynalite needs Node.js 20 or newer, found $(node --version)" >&2
    exit 1
  fi
  echo "bootstrap: installing dynalite into $NODE_DIR" >&2
  mkdir -p "$NODE_DIR"
  cp "$DYNALITE_SPEC/package.json" "$DYNALITE_SPEC/package-lock.json" "$NODE_DIR/"
  npm ci --prefix "$NODE_DIR" --ignore-scripts --no-audit --no-fund --loglevel=error >&2
  [[ -f "$NODE_DIR/node_modules/dynalite/cli.js" ]] || { echo "bootstrap: dynalite missing after install" >&2; exit 1; }
  printf '%s' "$want" > "$NODE_STAMP"
}
install_dynalite

VENV="$ROOT/.local/venv"
UV_VERSION="0.13.9"
PINS=(
  "moto[server]==5.2.5"
  "cargo-lambda==1.9.2"
  "cfn-lint==1.58.0"
  "openpyxl==3.1.5"
  "openapi-spec-validator==0.9.0"
)
STAMP="$VENV/.bootstrap-stamp"
WANT="uv==$UV_VERSION ${PINS[*]}"

have_tools() {
  [[ -x "$VENV/bin/moto_server" && -x "$VENV/bin/cargo-lambda" && -x "$VENV/bin/cfn-lint" ]]
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && have_tools; then
  exit 0
fi

command -v python3 >/dev/null || { echo "bootstrap: python3 is required (3.9 or newer)" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "bootstrap: creating $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi

if [[ ! -x "$VENV/bin/uv" ]] || [[ "$("$VENV/bin/uv" --version 2>/dev/null | awk '{print $2}')" != "$UV_VERSION" ]]; then
  echo "bootstrap: installing uv $UV_VERSION" >&2
  "$VENV/bin/python" -m pip install --quiet "uv==$UV_VERSION"
fi

echo "bootstrap: installing ${PINS[*]}" >&2
"$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" "${PINS[@]}"

have_tools || { echo "bootstrap: tools missing after install" >&2; exit 1; }
printf '%s' "$WANT" > "$STAMP"
echo "bootstrap: tools ready in $VENV" >&2
