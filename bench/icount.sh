#!/usr/bin/env bash
# bench/icount.sh — instructions per request of one or more `hall` binaries, counted by
# valgrind (callgrind), so two builds can be compared on a noisy machine (docs/performance.md).
#
# Each binary serves a fresh temp state dir under callgrind; after a warm-up, the counters are
# zeroed, N allowed requests are sent one after another on one keep-alive connection (like
# `wrk -c1`), and the counters are dumped. Prints one line per binary and mode: label, mode,
# user-space instructions per request (every thread of the daemon: HTTP workers, the audit
# maintenance thread, sled's threads). Kernel work is not counted (see the syscall table in
# docs/performance.md for that). The dumps are kept for `callgrind_annotate --inclusive=yes`.
#
# Usage: bench/icount.sh [--repo DIR] [--requests N] [--modes "batched durable"] [--out DIR]
#                        LABEL=BIN [LABEL=BIN …]
#   --repo: where registry/ and policies/ come from (default: this checkout); give LABEL=BIN@DIR
#   for a binary that needs an older checkout's files.
# Needs: valgrind, python3, curl. Only loopback.
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
REPO=$ROOT N=2000 MODES="batched durable" OUT=
BINS=()
while [ $# -gt 0 ]; do
	case $1 in
	--repo) REPO=$2 && shift 2 ;;
	--requests) N=$2 && shift 2 ;;
	--modes) MODES=$2 && shift 2 ;;
	--out) OUT=$2 && shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
	*=*) BINS+=("$1") && shift ;;
	*) echo "unknown argument: $1 (binaries are given as LABEL=BIN)" >&2 && exit 2 ;;
	esac
done
[ ${#BINS[@]} -gt 0 ] || { echo "give at least one LABEL=BIN" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Sequential allowed requests on one keep-alive connection; exits non-zero unless every one
# was answered 200 with "allowed":true (a build that errors must not look cheap).
client() { # port token n
	python3 - "$@" <<'EOF'
import http.client, sys
port, tok, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
body = '{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}'
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    c.request("POST", "/api/route", body, {"Authorization": "Bearer " + tok, "Content-Type": "application/json"})
    r = c.getresponse()
    d = r.read()
    if r.status != 200 or b'"allowed":true' not in d:
        sys.exit(f"request {i}: {r.status} {d[:200]!r}")
EOF
}

for spec in "${BINS[@]}"; do
	label=${spec%%=*} bin=${spec#*=} repo=$REPO
	case $bin in *@*) repo=${bin#*@} bin=${bin%@*} ;; esac
	for mode in $MODES; do
		d=$(mktemp -d)
		cp -r "$repo/registry" "$repo/policies" "$d/"
		port=$(free_port)
		HALL_KEYRING=off valgrind --tool=callgrind --callgrind-out-file="$OUT/$label-$mode.%p" \
			"$bin" serve --listen "127.0.0.1:$port" --state-dir "$d/state" --registry "$d/registry" \
			--policies "$d/policies" --audit-durability "$mode" >"$d/log" 2>&1 &
		pid=$!
		for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.2; done
		tok=$(cat "$d/state/admin.token")
		client "$port" "$tok" 200
		callgrind_control -z "$pid" >/dev/null 2>&1
		client "$port" "$tok" "$N"
		callgrind_control -d "$pid" >/dev/null 2>&1
		kill "$pid"
		wait "$pid" 2>/dev/null || true
		dump="$OUT/$label-$mode.$pid.1" # the first (only) dump callgrind_control asked for
		[ -s "$dump" ] || { echo "$label $mode: no callgrind dump at $dump" >&2; exit 1; }
		ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
		echo "$label $mode instructions/req=$((ir / N)) dump=$dump"
		rm -rf "$d"
	done
done
