# Shared by scripts/serve, scripts/test and scripts/bench: create or update the local virtualenv.
# Usage: source scripts/_setup.sh [EXTRA]   (EXTRA: test, bench, ...)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
extra="${1:-}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "replay-proxy needs Python 3.11 or newer; set PYTHON=/path/to/python3.x" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setting up $VENV ..." >&2
  "$PYTHON" -m venv "$VENV"
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
# Reinstall only when the dependencies or the requested extra changed.
stamp="$VENV/.installed-$(echo "$extra" | tr -c 'a-z0-9\n' '_')"
digest="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
# Every extra includes the package itself: for none, any up-to-date install will do.
if [ -z "$extra" ]; then
  for other in "$VENV"/.installed-*; do
    [ -f "$other" ] && [ "$(cat "$other")" = "$digest" ] && stamp="$other" && break
  done
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  echo "installing replay-proxy${extra:+ with [$extra]} into $VENV ..." >&2
  log="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         (cd "$ROOT" && "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$spec"); } \
       >"$log" 2>&1; then
    cat "$log" >&2
    echo "installing replay-proxy failed; the log above is also in $log" >&2
    exit 1
  fi
  echo "$digest" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
