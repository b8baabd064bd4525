#!/usr/bin/env bash
# bench/load.sh — load test of `hall serve` against a bare actix-web floor (docs/performance.md).
#
# Builds release, generates a policy set of N capabilities (~10·N rules, default N=1100 →
# 10,010 rules), then on loopback with temporary state dirs:
#   - runs the floor (examples/floor.rs) and the daemon (per audit durability mode) under the
#     same wrk request mix (bench/mix.lua: allowed, denied, guardrail-denied, explain) at each
#     connection count, and prints req/s, p50/p99/p99.9 and the ratio to the floor;
#   - cold start: spawn → GET /ready 200, with the generated set and a fresh state dir;
#   - idle RSS after start, peak RSS (VmHWM) after the load runs;
#   - reload: rewrite one policy file while wrk runs; ms from the write until /api/status shows
#     the new policy_version, and no non-2xx response or socket error during the run;
#   - RSS after a million audited decisions (batched by default; --million-modes to change).
#
# Usage: bench/load.sh [--duration SECS] [--n N] [--modes "durable batched"] [--conns "1 16 64"]
#                      [--reloads K] [--million-modes "batched"|""] [--no-build]
# Needs: cargo, wrk, curl, jq (as root with apt, missing Debian packages are installed).
# Timings depend on the machine and on what else runs on it: see docs/performance.md.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"

DURATION=10
N=1100
MODES="durable batched"
CONNS="1 16 64"
RELOADS=5
MILLION_MODES="batched"
BUILD=1
while [ $# -gt 0 ]; do
	case $1 in
	--duration) DURATION=$2 && shift 2 ;;
	--n) N=$2 && shift 2 ;;
	--modes) MODES=$2 && shift 2 ;;
	--conns) CONNS=$2 && shift 2 ;;
	--reloads) RELOADS=$2 && shift 2 ;;
	--million-modes) MILLION_MODES=$2 && shift 2 ;;
	--no-build) BUILD=0 && shift ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "unknown argument: $1 (see --help)" >&2
		exit 2
		;;
	esac
done
for m in $MODES $MILLION_MODES; do
	case $m in durable | batched) ;; *)
		echo "unknown mode $m: durable or batched" >&2
		exit 2
		;;
	esac
done

# ---------------------------------------------------------------------------------------------
missing=()
for tool in wrk curl jq; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	else
		echo "missing: ${missing[*]} (apt-get install ${missing[*]})" >&2
		exit 1
	fi
fi

if [ "$BUILD" = 1 ]; then
	cargo build --release --bin hall --examples
fi
OUT=${CARGO_TARGET_DIR:-$ROOT/target}/release
HALL=$OUT/hall
FLOOR=$OUT/examples/floor
for b in "$HALL" "$FLOOR" "$OUT/examples/gen_policies"; do
	[ -x "$b" ] || {
		echo "$b not built (run without --no-build)" >&2
		exit 1
	}
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hall-load.XXXXXX")
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

"$OUT/examples/gen_policies" "$N" "$WORK/set"
RULES=$(grep -c '^\[\[rule\]\]' "$WORK"/set/policies/*.toml | awk -F: '{s += $2} END {print s}')

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# start LOG CMD...: run CMD in the background (stderr to LOG); sets PID and ADDR once it logs
# "listening on http://ADDR".
start() {
	local log=$1
	shift
	"$@" 2>"$log" >/dev/null &
	PID=$!
	PIDS+=("$PID")
	ADDR=
	local _
	for _ in $(seq 1 2000); do
		ADDR=$(sed -n 's|.*listening on http://\([0-9.:]*\).*|\1|p' "$log" | head -n1)
		[ -n "$ADDR" ] && return 0
		kill -0 "$PID" 2>/dev/null || break
		sleep 0.005
	done
	echo "server did not start: $*" >&2
	cat "$log" >&2
	exit 1
}

stop() {
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}

kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$2/status"; }
mb() { awk -v x="$1" 'BEGIN {printf "%.1f", x / 1024}'; }

# bench URL TOKEN CONNS SECS: prints "rps p50_us p99_us p999_us non2xx errors".
bench() {
	local threads=$(($3 < 2 ? $3 : 2))
	HALL_TOKEN=$2 HALL_N=$N wrk -t"$threads" -c"$3" -d"$4s" --timeout 5s -s "$ROOT/bench/mix.lua" "$1" |
		sed -n 's/^RESULT //p'
}

# The daemon with MODE on a fresh state dir STATE; sets PID, ADDR, TOKEN, START_MS (spawn →
# /ready 200).
start_daemon() {
	local mode=$1 state=$2 t0
	t0=$(now_ms)
	start "$state.log" env HALL_KEYRING=off "$HALL" serve --log-format json --listen 127.0.0.1:0 --state-dir "$state" \
		--registry "$WORK/set/registry" --policies "$WORK/set/policies" --audit-durability "$mode"
	until curl -fsS "http://$ADDR/ready" >/dev/null 2>&1; do sleep 0.002; done
	START_MS=$(($(now_ms) - t0))
	TOKEN=$(cat "$state/admin.token")
}

# How many policy sets the daemon's JSON log says it loaded.
loads() { grep -c '"policy set loaded"' "$1" || true; }
status() { curl -fsS -H "Authorization: Bearer $TOKEN" "http://$ADDR/api/status"; }
# The active policy_version, or nothing when the status request failed.
version() { status 2>/dev/null | jq -r .policy_version 2>/dev/null || true; }

ROWS=()
row() { ROWS+=("$(printf '%-8s %5s %9s %8s %8s %8s %6s %7s' "$@")"); }
fmt_ms() { awk -v x="$1" 'BEGIN {printf "%.2f", x / 1000}'; }

echo "== $(nproc) CPUs, $(uname -sr); $RULES rules, N=$N; wrk ${DURATION}s per row"

declare -A FLOOR_RPS
start "$WORK/floor.log" "$FLOOR"
bench "http://$ADDR/api/route" "" 64 2 >/dev/null # warm-up
for c in $CONNS; do
	read -r rps p50 p99 p999 non2xx errs <<<"$(bench "http://$ADDR/api/route" "" "$c" "$DURATION")"
	FLOOR_RPS[$c]=$rps
	row floor "$c" "$rps" "$(fmt_ms "$p50")" "$(fmt_ms "$p99")" "$(fmt_ms "$p999")" 1.00 "$((non2xx + errs))"
done
stop "$PID"

declare -A PEAK IDLE COLD RELOAD
for mode in $MODES; do
	start_daemon "$mode" "$WORK/state-$mode"
	COLD[$mode]=$START_MS
	sleep 1
	IDLE[$mode]=$(mb "$(kb VmRSS "$PID")")
	url="http://$ADDR/api/route"
	probe=$(curl -fsS -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
		-d '{"capability_id":"cap.f0.c000000","env":"prod","data_label":"INTERNAL","tenant_id":"org.zeta"}' "$url")
	[ "$(jq -r .allowed <<<"$probe")" = true ] || {
		echo "probe request not allowed: $probe" >&2
		exit 1
	}
	bench "$url" "$TOKEN" 64 2 >/dev/null # warm-up
	for c in $CONNS; do
		read -r rps p50 p99 p999 non2xx errs <<<"$(bench "$url" "$TOKEN" "$c" "$DURATION")"
		ratio=$(awk -v a="$rps" -v b="${FLOOR_RPS[$c]}" 'BEGIN {printf "%.2f", a / b}')
		row "$mode" "$c" "$rps" "$(fmt_ms "$p50")" "$(fmt_ms "$p99")" "$(fmt_ms "$p999")" "$ratio" "$((non2xx + errs))"
	done
	PEAK[$mode]=$(mb "$(kb VmHWM "$PID")")

	# Reload under load: rewrite the first rules file (content changes → new policy_version).
	file=$(find "$WORK/set/policies" -name '*-rules.toml' | sort | head -n1)
	bench "$url" "$TOKEN" 16 $((RELOADS + 2)) >"$WORK/reload-wrk.out" &
	wrk_pid=$!
	PIDS+=("$wrk_pid")
	sleep 1
	times=()
	for k in $(seq 1 "$RELOADS"); do
		before=$(version)
		seen=$(loads "$WORK/state-$mode.log")
		{
			cat "$file"
			printf '\n# reload %s %s\n' "$mode" "$k"
		} >"$WORK/next.toml"
		t0=$(date +%s%N)
		cat "$WORK/next.toml" >"$file"
		deadline=$(($(now_ms) + 10000))
		# The daemon logs "policy set loaded" right after the swap, with its own timestamp:
		# no polling delay in the figure (a curl + jq per poll costs ~40 ms under load).
		until [ "$(loads "$WORK/state-$mode.log")" -gt "$seen" ]; do
			[ "$(now_ms)" -lt "$deadline" ] || {
				echo "reload $k: no new policy set loaded within 10 s" >&2
				exit 1
			}
			sleep 0.005
		done
		ts=$(grep '"policy set loaded"' "$WORK/state-$mode.log" | tail -n1 | sed -n 's/.*"timestamp":"\([^"]*\)".*/\1/p')
		times+=($((($(date -d "$ts" +%s%N) - t0) / 1000000)))
		[ "$(version)" != "$before" ] || {
			echo "reload $k: policy_version did not change" >&2
			exit 1
		}
		sleep 0.3
	done
	wait "$wrk_pid"
	read -r _ _ _ _ non2xx errs <"$WORK/reload-wrk.out"
	RELOAD[$mode]="write→swap ms: ${times[*]}; non-2xx during the run: $non2xx, socket errors: $errs"
	stop "$PID"
done

echo
printf '%-8s %5s %9s %8s %8s %8s %6s %7s\n' mode conns req/s p50_ms p99_ms p99.9_ms ratio failed
printf '%s\n' "${ROWS[@]}"
echo
for mode in $MODES; do
	echo "$mode: cold start to /ready ${COLD[$mode]} ms; idle RSS ${IDLE[$mode]} MB; peak RSS (VmHWM) after the runs ${PEAK[$mode]} MB"
	echo "$mode: reload of $RULES rules under 16-connection load, ${RELOAD[$mode]}"
done

# ---------------------------------------------------------------------------------------------
for mode in $MILLION_MODES; do
	start_daemon "$mode" "$WORK/million-$mode"
	t0=$(now_ms)
	total=0
	while [ "$total" -lt 1000000 ]; do
		bench "http://$ADDR/api/route" "$TOKEN" 64 10 >/dev/null
		total=$(status | jq '.decisions.allowed + .decisions.denied')
	done
	echo "$mode: after $total audited decisions ($((($(now_ms) - t0) / 1000)) s): RSS $(mb "$(kb VmRSS "$PID")") MB, peak $(mb "$(kb VmHWM "$PID")") MB"
	stop "$PID"
done
