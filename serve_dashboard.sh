#!/usr/bin/env bash
# Install assets/dashboard.html into outputs/ and serve that folder over HTTP: the page shows the newest run live
# ("No run yet" until a script writes LATEST_RUN.txt there). Ctrl-C stops it.
#   bash serve_dashboard.sh [PORT [BIND]]   (PORT 1-65535: 8000; BIND: 127.0.0.1; OUT=folder: another --out root)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,4p' "$0"; exit 0 ;; esac
NAME=serve_dashboard.sh
PORT="${1:-8000}"
BIND="${2:-${BIND:-127.0.0.1}}"
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$HERE/outputs}"  # a relative OUT is taken from the current folder
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
if [[ ! "$PORT" =~ ^[0-9]{1,5}$ ]] || (( 10#$PORT < 1 || 10#$PORT > 65535 )); then
  echo "$NAME: error: PORT must be a number from 1 to 65535, got '$PORT'" >&2; exit 2
fi
PORT=$((10#$PORT))
if ! mkdir -p "$OUT" 2>/dev/null || [ ! -w "$OUT" ]; then
  echo "$NAME: error: cannot write the dashboard into OUT=$OUT (not a writable folder)" >&2; exit 2
fi
# a fresh copy at every start (a changed template replaces the old one), written whole: a temp file, then a rename
TMP="$OUT/dashboard.html.tmp$$"
if ! cp "$HERE/assets/dashboard.html" "$TMP" 2>/dev/null || ! mv -f "$TMP" "$OUT/dashboard.html"; then
  rm -f "$TMP"; echo "$NAME: error: cannot write $OUT/dashboard.html" >&2; exit 2
fi
case "$BIND" in
  127.0.0.1|0.0.0.0|::|::1) HOST=localhost ;;
  *:*) HOST="[$BIND]" ;;
  *) HOST="$BIND" ;;
esac
# Python binds and listens first; only then does it print the address, so the URL never points at another server.
exec "$PY" - "$PORT" "$BIND" "$OUT" "http://$HOST:$PORT/dashboard.html" <<'EOF'
import errno, functools, http.server, socket, sys
port, bind, out, url = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
try:
    family = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})
    server = server_class((bind, port), functools.partial(http.server.SimpleHTTPRequestHandler, directory=out))
except OSError as e:  # one line, exit 2, and no address printed
    why = "is in use (another server listens there): pick another, bash serve_dashboard.sh PORT" \
        if e.errno == errno.EADDRINUSE else f"cannot be opened ({e.strerror or e})"
    print(f"serve_dashboard.sh: error: port {port} on {bind} {why}", file=sys.stderr)
    sys.exit(2)
print(url, flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
EOF
