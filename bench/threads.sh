#!/usr/bin/env bash
# bench/threads.sh — where each of the daemon's threads spends a wrk row: running, or runnable
# and waiting for a core (docs/performance.md, "Durable at 64 connections").
#
# Serves a fresh temp state dir with BIN, sends ONE allowed request (bench/peer.lua) with wrk
# at the given connection count, and prints:
#   - wrk's row (req/s, p50/p99/p99.9 µs, requests);
#   - the machine's idle share during the row (/proc/stat): near 0 means the row was bound by
#     CPU, a larger share that requests waited on something else (a disk sync, a thread hop);
#   - the daemon's CPU µs per request, two ways: utime+stime ticks from /proc/PID/stat (as
#     bench/ab.sh counts it) and every thread's run time from schedstat (in ns);
#   - per thread name (threads of one name, such as the HTTP workers or sled's I/O pool,
#     summed): ms on a core, ms runnable but waiting for one, and time slices (from
#     /proc/PID/task/*/schedstat);
#   - audit records per flush (from /metrics).
# A latency-critical thread that waits for a core far longer than it runs is the sign of a
# hop the row pays for on a saturated machine.
#
# Usage: bench/threads.sh BIN [--mode durable|batched] [--conns N] [--duration SECS] [--repo DIR]
#   BIN: a `hall` binary, or `floor` for this checkout's target/release/examples/floor (build it
#   with `cargo build --release --examples`).
#   --repo: where registry/ and policies/ come from (default: this checkout).
# Needs: wrk, curl, python3; a kernel with schedstats (/proc/PID/task/*/schedstat). Only loopback.
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit 2
fi
BIN=$1 && shift
REPO=$ROOT MODE=durable CONNS=64 DURATION=4
while [ $# -gt 0 ]; do
	case $1 in
	--mode) MODE=$2 && shift 2 ;;
	--conns) CONNS=$2 && shift 2 ;;
	--duration) DURATION=$2 && shift 2 ;;
	--repo) REPO=$2 && shift 2 ;;
	*) echo "unknown argument: $1" >&2 && exit 2 ;;
	esac
done
d=$(mktemp -d)
pid=
cleanup() {
	[ -z "$pid" ] || { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
	rm -rf "$d"
}
trap cleanup EXIT
printf '%s' '{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}' >"$d/body"
cp -r "$REPO/registry" "$REPO/policies" "$d/"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ "$BIN" = floor ]; then
	# The bare actix floor (examples/floor.rs): no audit, no token.
	MODE=floor
	"$ROOT/target/release/examples/floor" "127.0.0.1:$port" >"$d/log" 2>&1 &
	pid=$!
	sleep 0.5
	token=none
else
	HALL_KEYRING=off "$BIN" serve --listen "127.0.0.1:$port" --state-dir "$d/state" \
		--registry "$d/registry" --policies "$d/policies" --audit-durability "$MODE" >"$d/log" 2>&1 &
	pid=$!
	for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
	token=$(cat "$d/state/admin.token")
fi

# One line per thread: tid, name (spaces as _), ns on a core, ns waiting for one, slices.
threads() {
	local t
	for t in "/proc/$pid/task/"*; do
		echo "${t##*/} $(tr ' ' _ <"$t/comm") $(cat "$t/schedstat")"
	done | sort
}
# "idle total" jiffies of the whole machine.
machine() { awk '/^cpu /{ print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
# utime + stime of the whole process, in clock ticks.
ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
flushes() {
	[ "$token" != none ] || { echo "0 0"; return; }
	curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$port/metrics" |
		awk '/^hall_audit_appended_total /{a=$2} /^hall_audit_flushes_total /{f=$2} END{print a + 0, f + 0}'
}

threads >"$d/before"
c1=$(ticks)
m1=$(machine)
f1=$(flushes)
out=$(BENCH_PATH=/api/route BENCH_BODY_FILE="$d/body" BENCH_TOKEN=$token \
	wrk -t"$((CONNS < 2 ? 1 : 2))" -c"$CONNS" -d"${DURATION}s" -s "$ROOT/bench/peer.lua" \
	"http://127.0.0.1:$port/api/route" | grep '^RESULT')
threads >"$d/after"
c2=$(ticks)
m2=$(machine)
f2=$(flushes)
# RESULT req/s p50_us p99_us p999_us non2xx socket_errors requests
read -r _ rps p50 p99 p999 non2xx errs reqs <<<"$out"
echo "$MODE c=$CONNS req/s=$rps p50=${p50}us p99=${p99}us p99.9=${p999}us non2xx=$non2xx err=$errs requests=$reqs"
awk -v a="$m1" -v b="$m2" -v f1="$f1" -v f2="$f2" -v t=$((c2 - c1)) -v hz="$(getconf CLK_TCK)" -v n="$reqs" 'BEGIN {
	printf "CPU us/request from utime+stime (as bench/ab.sh): %.1f\n", t / hz * 1e6 / n
	split(a, x, " "); split(b, y, " "); split(f1, p, " "); split(f2, q, " ")
	printf "machine idle share: %.3f\n", (y[1] - x[1]) / (y[2] - x[2])
	n = q[2] - p[2]
	if (n > 0) printf "audit records per flush: %.1f (%d flushes)\n", (q[1] - p[1]) / n, n
}'
# Threads that started after the first snapshot count from zero.
join -a 2 -e 0 -o 2.2,1.3,1.4,1.5,2.3,2.4,2.5 "$d/before" "$d/after" | awk -v n="$reqs" '
	{
		name = $1; sub(/^sled-io-[0-9]+$/, "sled-io", name)
		run[name] += ($5 - $2) / 1e6; wait[name] += ($6 - $3) / 1e6; slices[name] += $7 - $4
		count[name]++; total += ($5 - $2) / 1e3
	}
	END {
		printf "CPU us/request from the threads\x27 run time: %.1f\n", total / n
		printf "%-24s %10s %10s %8s\n", "thread (how many)", "run ms", "wait ms", "slices"
		for (t in run) if (run[t] >= 1)
			printf "%-24s %10.1f %10.1f %8d\n", t " (" count[t] ")", run[t], wait[t], slices[t] | "sort"
	}'
