#!/usr/bin/env bash
# Installs the project's Python tools into .local/venv (gitignored): the AWS emulator (moto),
# cargo-lambda and cfn-lint, and the readers CI checks files with, at pinned versions. Idempotent; returns at once when the stamp
# matches the pins.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
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
