#!/usr/bin/env bash
# Serve outputs/ over HTTP so outputs/dashboard.html can show the newest run live (Ctrl-C stops it).
#   bash serve_dashboard.sh [PORT [BIND]]   (PORT 8000, BIND 127.0.0.1; OUT=folder serves another --out root)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,3p' "$0"; exit 0 ;; esac
PORT="${1:-8000}"
BIND="${2:-${BIND:-127.0.0.1}}"
OUT="${OUT:-$(dirname "$0")/outputs}"  # a relative OUT is taken from the current folder
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
if [[ ! "$PORT" =~ ^[0-9]+$ ]]; then
  echo "serve_dashboard.sh: PORT must be a number, got '$PORT'" >&2; exit 2
fi
if [ ! -f "$OUT/dashboard.html" ]; then
  echo "serve_dashboard.sh: $OUT/dashboard.html does not exist yet: run a script first (e.g. python ddpm_states.py --quick)" >&2
  exit 2
fi
case "$BIND" in
  127.0.0.1|0.0.0.0|::|::1) HOST=localhost ;;
  *:*) HOST="[$BIND]" ;;
  *) HOST="$BIND" ;;
esac
echo "http://$HOST:$PORT/dashboard.html"
exec "$PY" -m http.server "$PORT" --bind "$BIND" --directory "$OUT"
