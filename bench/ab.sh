#!/usr/bin/env bash
# bench/ab.sh — A/B two `hall` binaries on the same work, interleaved (docs/performance.md).
#
# Each binary serves a fresh temp state dir on the given registry/policies (per durability
# mode); wrk sends ONE allowed request (bench/peer.lua) at each connection count. Prints one
# line per row: label, mode, conns, req/s, p50/p99/p99.9 µs, non-2xx, socket errors, CPU
# µs/request (the daemon's utime+stime from /proc ÷ requests) and audit records per flush (from
# /metrics: the group-commit size; "?" for a build without those counters). Rounds alternate A
# and B so that drift on a shared machine hits both.
#
# Usage: bench/ab.sh BIN_A BIN_B [--repo-a DIR] [--repo-b DIR] [--rounds K] [--duration SECS]
#                    [--conns "1 64"] [--modes "durable batched"] [--floor]
#   --repo-a/--repo-b: where each binary's registry/ and policies/ come from (default: this
#   checkout; give an older checkout when the older binary cannot read today's policy keys).
#   --floor: each round first runs the bare actix floor (target/release/examples/floor; build
#   it with `cargo build --release --examples`) at each connection count, and every A/B line
#   adds of_floor=, its req/s over that round's floor at the same count: the ratio the
#   throughput targets are stated in, measured in the same minutes.
# Needs: wrk, curl. Only loopback.
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
[ $# -ge 2 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
A=$1 B=$2; shift 2
REPO_A=$ROOT REPO_B=$ROOT ROUNDS=2 DURATION=4 CONNS="1 64" MODES="durable batched" FLOOR=
# The floor's req/s in the current round, by connection count (with --floor).
declare -A FLOOR_RPS=()
while [ $# -gt 0 ]; do
	case $1 in
	--repo-a) REPO_A=$2 && shift 2 ;;
	--repo-b) REPO_B=$2 && shift 2 ;;
	--rounds) ROUNDS=$2 && shift 2 ;;
	--duration) DURATION=$2 && shift 2 ;;
	--conns) CONNS=$2 && shift 2 ;;
	--modes) MODES=$2 && shift 2 ;;
	--floor) FLOOR=1 && shift ;;
	*) echo "unknown argument: $1" >&2 && exit 2 ;;
	esac
done
HZ=$(getconf CLK_TCK)
BODY=$(mktemp)
trap 'rm -f "$BODY"' EXIT
printf '%s' '{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}' >"$BODY"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# audit_counts PORT TOKEN: "appended flushes" from /metrics (empty when absent).
audit_counts() {
	curl -sf -H "Authorization: Bearer $2" "http://127.0.0.1:$1/metrics" |
		awk '/^hall_audit_appended_total /{a=$2} /^hall_audit_flushes_total /{f=$2} END{if (a != "" && f != "") print a, f}' || true
}

# wrk_row PID PORT TOKEN CONNS: one wrk row against the server PID listening on PORT; sets
# ROW_RPS and ROW (the fields every line prints: conns, req/s, latencies, errors, CPU µs/req).
wrk_row() {
	local pid=$1 port=$2 token=$3 c=$4 t=$(($4 < 2 ? 1 : 2)) c1 c2 out rps p50 p99 p999 non2xx errs reqs
	c1=$(cpu_ticks "$pid")
	out=$(BENCH_PATH=/api/route BENCH_BODY_FILE=$BODY BENCH_TOKEN=$token \
		wrk -t"$t" -c"$c" -d"${DURATION}s" -s "$ROOT/bench/peer.lua" "http://127.0.0.1:$port/api/route" | grep '^RESULT')
	c2=$(cpu_ticks "$pid")
	# RESULT req/s p50_us p99_us p999_us non2xx socket_errors requests
	read -r _ rps p50 p99 p999 non2xx errs reqs <<<"$out"
	ROW_RPS=$rps
	ROW="c=$c req/s=$rps p50=${p50}us p99=${p99}us p99.9=${p999}us non2xx=$non2xx err=$errs"
	ROW+=" cpu_us/req=$(awk -v t=$((c2 - c1)) -v hz="$HZ" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')"
}

stop() { # pid dir
	kill "$1"
	wait "$1" 2>/dev/null || true
	rm -rf "$2"
}

run() { # label bin repo mode
	local label=$1 bin=$2 repo=$3 mode=$4 d port pid token
	d=$(mktemp -d)
	cp -r "$repo/registry" "$repo/policies" "$d/"
	port=$(free_port)
	HALL_KEYRING=off "$bin" serve --listen "127.0.0.1:$port" --state-dir "$d/state" \
		--registry "$d/registry" --policies "$d/policies" --audit-durability "$mode" >"$d/log" 2>&1 &
	pid=$!
	for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
	token=$(cat "$d/state/admin.token")
	for c in $CONNS; do
		local m1 m2 per_flush='?'
		m1=$(audit_counts "$port" "$token")
		wrk_row "$pid" "$port" "$token" "$c"
		m2=$(audit_counts "$port" "$token")
		if [ -n "$m1" ] && [ -n "$m2" ]; then
			per_flush=$(awk -v a="$m1" -v b="$m2" 'BEGIN { split(a, x, " "); split(b, y, " "); f = y[2] - x[2]; printf "%.1f", (f > 0 ? (y[1] - x[1]) / f : 0) }')
		fi
		echo "$label $mode $ROW records/flush=$per_flush$(of_floor "$c" "$ROW_RPS")"
	done
	stop "$pid" "$d"
}

# of_floor CONNS RPS: " of_floor=R" against this round's floor, or nothing without --floor.
of_floor() {
	[ -n "${FLOOR_RPS[$1]:-}" ] || return 0
	awk -v r="$2" -v f="${FLOOR_RPS[$1]}" 'BEGIN { printf " of_floor=%.2f", (f > 0 ? r / f : 0) }'
}

run_floor() { # label
	local d port pid
	d=$(mktemp -d)
	port=$(free_port)
	"$ROOT/target/release/examples/floor" "127.0.0.1:$port" >"$d/log" 2>&1 &
	pid=$!
	for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
	for c in $CONNS; do
		wrk_row "$pid" "$port" none "$c"
		FLOOR_RPS[$c]=$ROW_RPS
		echo "$1 floor $ROW"
	done
	stop "$pid" "$d"
}

if [ -n "$FLOOR" ] && [ ! -x "$ROOT/target/release/examples/floor" ]; then
	echo "--floor needs target/release/examples/floor: cargo build --release --examples" >&2
	exit 2
fi

for r in $(seq "$ROUNDS"); do
	[ -z "$FLOOR" ] || run_floor "F(r$r)"
	for mode in $MODES; do
		run "A(r$r)" "$A" "$REPO_A" "$mode"
		run "B(r$r)" "$B" "$REPO_B" "$mode"
	done
done
