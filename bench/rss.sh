#!/usr/bin/env bash
# bench/rss.sh — how a `hall` binary's memory behaves under audit load and after it
# (docs/performance.md, "RSS after the load stops").
#
# Each binary serves a fresh temp state dir on a generated set of 10,010 rules
# (examples/gen_policies, N=1100) in batched audit mode. wrk sends ONE allowed request at 64
# connections for --rounds rounds of --secs seconds; after each round the daemon's RSS is
# printed, then it is sampled --idle times every --step seconds while nothing is sent (a
# daemon whose RSS still rises there is doing work of its own). Last: peak RSS (VmHWM), CPU
# µs/request over the load rounds (utime+stime from /proc ÷ requests), the size of the
# database directory, and the number of audited decisions.
#
# Usage: bench/rss.sh [--rounds K] [--secs S] [--idle K] [--step S] BIN [BIN …]
#   defaults: 5 rounds of 10 s (≈ 1 M decisions on a 2-core machine), 4 idle samples 5 s apart.
# Needs: wrk, curl, python3, and examples/gen_policies built (cargo build --release --examples).
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
ROUNDS=5 SECS=10 IDLE=4 STEP=5
BINS=()
while [ $# -gt 0 ]; do
	case $1 in
	--rounds) ROUNDS=$2 && shift 2 ;;
	--secs) SECS=$2 && shift 2 ;;
	--idle) IDLE=$2 && shift 2 ;;
	--step) STEP=$2 && shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
	-*) echo "unknown option: $1" >&2 && exit 2 ;;
	*) BINS+=("$1") && shift ;;
	esac
done
[ ${#BINS[@]} -gt 0 ] || { echo "give at least one hall binary" >&2; exit 2; }
GEN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/gen_policies
[ -x "$GEN" ] || { echo "$GEN not built (cargo build --release --examples)" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hall-rss.XXXXXX")
PID=
cleanup() {
	[ -z "$PID" ] || kill "$PID" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
"$GEN" 1100 "$WORK/set" >/dev/null
BODY=$WORK/body.json
# An allowed request of the generated set (as in bench/mix.lua: tenant org.zeta, INTERNAL).
printf '%s' '{"capability_id":"cap.f0.c000000","env":"prod","data_label":"INTERNAL","tenant_id":"org.zeta"}' >"$BODY"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_mb() { awk '/^VmRSS/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

for bin in "${BINS[@]}"; do
	d=$WORK/run
	rm -rf "$d" && mkdir -p "$d"
	port=$(free_port)
	HALL_KEYRING=off "$bin" serve --listen "127.0.0.1:$port" --state-dir "$d/state" \
		--registry "$WORK/set/registry" --policies "$WORK/set/policies" --audit-durability batched >"$d/log" 2>&1 &
	PID=$!
	for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
	token=$(cat "$d/state/admin.token")
	answer=$(curl -sS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' --data-binary "@$BODY" "http://127.0.0.1:$port/api/route")
	case $answer in *'"allowed":true'*) ;; *) echo "$bin: the request is not allowed: $answer" >&2 && exit 1 ;; esac
	line="idle=$(rss_mb "$PID")MB load:"
	c0=$(cpu_ticks "$PID") n=0
	for _ in $(seq "$ROUNDS"); do
		out=$(BENCH_PATH=/api/route BENCH_BODY_FILE=$BODY BENCH_TOKEN=$token \
			wrk -t2 -c64 -d"${SECS}s" -s "$ROOT/bench/peer.lua" "http://127.0.0.1:$port/api/route" | sed -n 's/^RESULT //p')
		read -r _ _ _ _ _ _ reqs <<<"$out"
		n=$((n + reqs))
		line="$line $(rss_mb "$PID")"
	done
	c1=$(cpu_ticks "$PID")
	line="$line MB; after:"
	for _ in $(seq "$IDLE"); do
		sleep "$STEP"
		line="$line $(rss_mb "$PID")"
	done
	hwm=$(awk '/^VmHWM/ {printf "%d", $2 / 1024}' "/proc/$PID/status")
	cpu=$(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v n="$n" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
	kill "$PID"
	wait "$PID" 2>/dev/null || true
	PID=
	echo "$(basename "$bin"): $line MB (every ${STEP}s); peak ${hwm}MB; cpu_us/req=$cpu; db=$(du -sm "$d/state/db" | cut -f1)MB; decisions=$n"
done
