#!/usr/bin/env bash
# bench/load.sh — load test of `hall serve` against a bare actix-web floor and its peers
# (docs/performance.md).
#
# Main section: builds release, generates a policy set of N capabilities (~10·N rules, default
# N=1100 → 10,010 rules), then on loopback with temporary state dirs:
#   - runs the floor (examples/floor.rs) and the daemon (per audit durability mode) under the
#     same wrk request mix (bench/mix.lua: allowed, denied, guardrail-denied, explain) at each
#     connection count, and prints req/s, p50/p99/p99.9 and the ratio to the floor;
#   - cold start: spawn → GET /ready 200, with the generated set and a fresh state dir;
#   - idle RSS after start, peak RSS (VmHWM) after the load runs;
#   - reload: rewrite one policy file while wrk runs; ms from the write until /api/status shows
#     the new policy_version, and no non-2xx response or socket error during the run;
#   - RSS after a million audited decisions (batched by default; --million-modes to change).
#
# Peer section (on by default): the same decision asked of every system, ONE allowed request
# repeated by wrk (bench/peer.lua) — the README's first request (cap.doc.summarize, dev, PUBLIC,
# tenant your-org) — at each connection count:
#   - floor: examples/floor.rs, a constant answer (what HTTP alone costs);
#   - floor + append & sync (with durable in --modes): the floor that first appends 400 bytes to
#     a file and syncs them as sled's flush does (`floor --sync FILE`): what a durable answer
#     cannot go below on this disk, whatever the log;
#   - floor + group-committed sync (with durable in --modes): the same, but each request hands
#     its record to one syncing thread that writes and syncs everything pending at once
#     (`floor --sync FILE --group`): the shape of Hall's durable design without Hall or sled,
#     what durability costs at many connections on this disk;
#   - floor + sled flush per request, floor + sled group commit (with durable in --modes): the
#     same two, with the record stored in a sled database opened as the daemon opens its own
#     (`floor --sled DIR [--group]`): what durability costs with the audit log's store and
#     nothing of Hall above it;
#   - Hall, per audit durability mode (--modes), on the shipped ./registry and ./policies, a
#     fresh state dir each time, the admin token it creates;
#   - cerbos: Cerbos PDP 0.51.0 (npm package `cerbos`), the example rule as a resource policy
#     (bench/peers/cerbos/), local audit backend on (decision logs in a temp dir);
#   - pyhall: PyHall (pyhall-wcp 0.2.2) make_decision behind Flask/werkzeug's threaded server
#     (bench/peers/pyhall_app.py, bench/peers/pyhall/).
#   Each system must answer "allowed" to the request before the load and after it, or its rows
#   are refused. Columns: req/s; p50/p99/p99.9 ms (wrk's latency histogram); CPU µs/req = the
#   server process's utime+stime (all threads, plus waited-for children) from /proc/PID/stat
#   read just before and just after the wrk run, ÷ requests completed (CLK_TCK from getconf);
#   non-2xx answers and socket errors: a row with any is not reported (its cells show "—"),
#   and the script then exits 1.
#   --rounds K repeats the whole table K times (systems interleaved) and prints each cell's
#   median. Peers install into ${HALL_BENCH_CACHE:-~/.cache/hall-bench} (npm, pip in a venv),
#   never into the repository; when npm/pip are missing or an install fails, that peer is
#   skipped with a warning and the other rows still run.
#
# Usage: bench/load.sh [--duration SECS] [--n N] [--modes "durable batched"] [--conns "1 16 64"]
#                      [--reloads K] [--million-modes "batched"|""] [--no-build]
#                      [--only main|peers] [--no-peers] [--peers "cerbos pyhall"] [--rounds K]
#   --only peers          only the peer table (no generated set, reload, RSS or million run)
#   --only main           everything but the peer table (same as --no-peers)
#   --peers "cerbos"      which outside systems join floor and Hall in the peer table ("" = none)
#   --rounds K            peer table: K rounds, median per cell (default 1)
# Needs: cargo, wrk, curl, jq (as root with apt, missing Debian packages are installed); for
# the peers, npm (Cerbos) and python3 with venv (PyHall).
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
RUN_MAIN=1
RUN_PEERS=1
PEERS="cerbos pyhall"
ROUNDS=1
while [ $# -gt 0 ]; do
	case $1 in
	--duration) DURATION=$2 && shift 2 ;;
	--n) N=$2 && shift 2 ;;
	--modes) MODES=$2 && shift 2 ;;
	--conns) CONNS=$2 && shift 2 ;;
	--reloads) RELOADS=$2 && shift 2 ;;
	--million-modes) MILLION_MODES=$2 && shift 2 ;;
	--no-build) BUILD=0 && shift ;;
	--only)
		case $2 in
		peers) RUN_MAIN=0 RUN_PEERS=1 ;;
		main) RUN_MAIN=1 RUN_PEERS=0 ;;
		*)
			echo "--only $2: main or peers" >&2
			exit 2
			;;
		esac
		shift 2
		;;
	--no-peers) RUN_PEERS=0 && shift ;;
	--peers) PEERS=$2 && shift 2 ;;
	--rounds) ROUNDS=$2 && shift 2 ;;
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
for p in $PEERS; do
	case $p in cerbos | pyhall) ;; *)
		echo "unknown peer $p: cerbos or pyhall" >&2
		exit 2
		;;
	esac
done
case $ROUNDS in '' | *[!0-9]* | 0)
	echo "--rounds $ROUNDS: a whole number ≥ 1" >&2
	exit 2
	;;
esac
case $DURATION in '' | *[!0-9]* | 0)
	echo "--duration $DURATION: whole seconds ≥ 1" >&2
	exit 2
	;;
esac
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
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# spawn LOG CMD...: run CMD in the background (stderr to LOG, stdout discarded); sets PID.
spawn() {
	local log=$1
	shift
	"$@" 2>"$log" >/dev/null &
	PID=$!
	PIDS+=("$PID")
}

# wait_listening LOG: sets ADDR once the server PID logs "listening on http://ADDR" to LOG;
# fails when it exits first or takes more than ~10 s.
wait_listening() {
	ADDR=
	local _
	for _ in $(seq 1 2000); do
		ADDR=$(sed -n 's|.*listening on http://\([0-9.:]*\).*|\1|p' "$1" | head -n1)
		[ -n "$ADDR" ] && return 0
		kill -0 "$PID" 2>/dev/null || break
		sleep 0.005
	done
	return 1
}

# start LOG CMD...: spawn CMD; sets PID and ADDR once it logs "listening on http://ADDR".
start() {
	local log=$1
	spawn "$@"
	shift
	wait_listening "$log" && return 0
	echo "server did not start: $*" >&2
	cat "$log" >&2
	exit 1
}

# stop PID: end a server this script started and forget it (so cleanup never signals a
# recycled pid).
stop() {
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
	local p keep=()
	for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$2/status"; }
mb() { awk -v x="$1" 'BEGIN {printf "%.1f", x / 1024}'; }

# bench URL TOKEN CONNS SECS: prints "rps p50_us p99_us p999_us non2xx errors".
bench() {
	local threads=$(($3 < 2 ? $3 : 2))
	HALL_TOKEN=$2 HALL_N=$N wrk -t"$threads" -c"$3" -d"$4s" --timeout 5s -s "$ROOT/bench/mix.lua" "$1" |
		sed -n 's/^RESULT //p'
}

# The daemon with MODE on a fresh state dir STATE, on the registry and policy dirs REG and POL
# (default: the generated set); sets PID, ADDR, TOKEN, START_MS (spawn → /ready 200).
start_daemon() {
	local mode=$1 state=$2 reg=${3:-$WORK/set/registry} pol=${4:-$WORK/set/policies} t0
	t0=$(now_ms)
	start "$state.log" env HALL_KEYRING=off "$HALL" serve --log-format json --listen 127.0.0.1:0 --state-dir "$state" \
		--registry "$reg" --policies "$pol" --audit-durability "$mode"
	until curl -fsS "http://$ADDR/ready" >/dev/null 2>&1; do sleep 0.002; done
	START_MS=$(($(now_ms) - t0))
	TOKEN=$(cat "$state/admin.token")
}

# How many policy sets the daemon's JSON log says it loaded.
loads() { grep -c '"policy set loaded"' "$1" || true; }
status() { curl -fsS -H "Authorization: Bearer $TOKEN" "http://$ADDR/api/status"; }
# The active policy_version, or nothing when the status request failed.
version() { status 2>/dev/null | jq -r .policy_version 2>/dev/null || true; }

fmt_ms() { awk -v x="$1" 'BEGIN {printf "%.2f", x / 1000}'; }

echo "== $(nproc) CPUs, $(uname -sr); wrk ${DURATION}s per row"

# ---------------------------------------------------------------------------------------------
# Main section: the generated 10k-rule set under the request mix, reload, RSS, cold start.
main_section() {
	"$OUT/examples/gen_policies" "$N" "$WORK/set"
	local rules
	rules=$(grep -c '^\[\[rule\]\]' "$WORK"/set/policies/*.toml | awk -F: '{s += $2} END {print s}')
	echo "== main: $rules rules, N=$N"

	local rows=() c rps p50 p99 p999 non2xx errs mode url probe ratio file wrk_pid times k before seen t0 deadline ts
	row() { rows+=("$(printf '%-8s %5s %9s %8s %8s %8s %6s %7s' "$@")"); }
	declare -A floor_rps peak idle cold reload

	start "$WORK/floor.log" "$FLOOR"
	bench "http://$ADDR/api/route" "" 64 2 >/dev/null # warm-up
	for c in $CONNS; do
		read -r rps p50 p99 p999 non2xx errs <<<"$(bench "http://$ADDR/api/route" "" "$c" "$DURATION")"
		floor_rps[$c]=$rps
		row floor "$c" "$rps" "$(fmt_ms "$p50")" "$(fmt_ms "$p99")" "$(fmt_ms "$p999")" 1.00 "$((non2xx + errs))"
	done
	stop "$PID"

	for mode in $MODES; do
		start_daemon "$mode" "$WORK/state-$mode"
		cold[$mode]=$START_MS
		sleep 1
		idle[$mode]=$(mb "$(kb VmRSS "$PID")")
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
			ratio=$(awk -v a="$rps" -v b="${floor_rps[$c]}" 'BEGIN {printf "%.2f", a / b}')
			row "$mode" "$c" "$rps" "$(fmt_ms "$p50")" "$(fmt_ms "$p99")" "$(fmt_ms "$p999")" "$ratio" "$((non2xx + errs))"
		done
		peak[$mode]=$(mb "$(kb VmHWM "$PID")")

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
		reload[$mode]="write→swap ms: ${times[*]}; non-2xx during the run: $non2xx, socket errors: $errs"
		stop "$PID"
	done

	echo
	printf '%-8s %5s %9s %8s %8s %8s %6s %7s\n' mode conns req/s p50_ms p99_ms p99.9_ms ratio failed
	printf '%s\n' "${rows[@]}"
	echo
	for mode in $MODES; do
		echo "$mode: cold start to /ready ${cold[$mode]} ms; idle RSS ${idle[$mode]} MB; peak RSS (VmHWM) after the runs ${peak[$mode]} MB"
		echo "$mode: reload of $rules rules under 16-connection load, ${reload[$mode]}"
	done

	local total
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
}

# ---------------------------------------------------------------------------------------------
# Peer section: one allowed request, the same decision asked of each system.

CACHE=${HALL_BENCH_CACHE:-$HOME/.cache/hall-bench}
PEER_DIR=$ROOT/bench/peers
# The README's first request; every system but Cerbos gets these exact bytes.
HALL_BODY='{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"your-org"}'
CLK_TCK=$(getconf CLK_TCK)
SKIPPED=()

warn() {
	printf '\n!!! %s\n\n' "$*" >&2
	SKIPPED+=("$*")
}

# setup_cerbos: sets CERBOS (the PDP binary) from the cache, installing the npm package there
# when needed; fails (after a warning) when it cannot.
setup_cerbos() {
	local dir=$CACHE/cerbos
	find_cerbos() {
		CERBOS=$(find "$dir/node_modules/@cerbos" -mindepth 2 -maxdepth 2 -type f -name 'cerbos-*' -perm -u+x \
			2>/dev/null | head -n1)
		[ -n "$CERBOS" ] && [ "$("$CERBOS" --version 2>/dev/null | head -n1)" = 0.51.0 ]
	}
	find_cerbos && return 0
	if ! command -v npm >/dev/null 2>&1; then
		warn "Cerbos SKIPPED: npm not found (install Node.js and npm, or drop it with --peers)"
		return 1
	fi
	echo "installing cerbos@0.51.0 (npm) into $dir"
	mkdir -p "$dir"
	if ! npm install --prefix "$dir" --no-audit --no-fund --loglevel=error cerbos@0.51.0 >"$WORK/npm.log" 2>&1; then
		warn "Cerbos SKIPPED: npm install --prefix $dir cerbos@0.51.0 failed: $(tail -n 5 "$WORK/npm.log")"
		return 1
	fi
	find_cerbos || {
		warn "Cerbos SKIPPED: no cerbos 0.51.0 binary for $(uname -sm) under $dir/node_modules/@cerbos"
		return 1
	}
}

# setup_pyhall: sets PYTHON (a venv in the cache with pyhall-wcp 0.2.2 and flask), creating it
# when needed; fails (after a warning) when it cannot.
setup_pyhall() {
	local venv=$CACHE/pyhall-venv
	PYTHON=$venv/bin/python
	local check='import sys, flask, pyhall; sys.exit(pyhall.__version__ != "0.2.2")'
	"$PYTHON" -c "$check" 2>/dev/null && return 0
	if ! command -v python3 >/dev/null 2>&1; then
		warn "PyHall SKIPPED: python3 not found (install python3 and python3-venv, or drop it with --peers)"
		return 1
	fi
	echo "installing pyhall-wcp==0.2.2 flask (pip) into $venv"
	if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check \
		pyhall-wcp==0.2.2 flask; } >"$WORK/pip.log" 2>&1; then
		warn "PyHall SKIPPED: venv + pip install pyhall-wcp==0.2.2 flask into $venv failed: $(tail -n 5 "$WORK/pip.log")"
		return 1
	fi
	"$PYTHON" -c "$check" || {
		warn "PyHall SKIPPED: $venv has no pyhall 0.2.2 with flask after the install"
		return 1
	}
}

# A loopback TCP port nothing listens on now.
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 40000))
		(: </dev/tcp/127.0.0.1/"$p") 2>/dev/null || {
			echo "$p"
			return
		}
	done
}

# peer_start SYSTEM ROUND: start SYSTEM; sets PID, URL, BODY (a file), TOKEN (may be empty).
# Fails when a peer does not start (Hall or the floor not starting ends the script).
peer_start() {
	local sys=$1 round=$2 log=$WORK/peer-$1-$2.log
	BODY=$WORK/hall-body.json
	TOKEN=
	case $sys in
	floor)
		start "$log" "$FLOOR"
		URL=http://$ADDR/api/route
		;;
	floor-sync)
		start "$log" "$FLOOR" --sync "$WORK/floor-sync-$round.log"
		URL=http://$ADDR/api/route
		;;
	floor-group)
		start "$log" "$FLOOR" --sync "$WORK/floor-group-$round.log" --group
		URL=http://$ADDR/api/route
		;;
	floor-sled)
		start "$log" "$FLOOR" --sled "$WORK/floor-sled-$round"
		URL=http://$ADDR/api/route
		;;
	floor-sled-group)
		start "$log" "$FLOOR" --sled "$WORK/floor-sled-group-$round" --group
		URL=http://$ADDR/api/route
		;;
	durable | batched)
		start_daemon "$sys" "$WORK/peer-state-$sys-$round" "$ROOT/registry" "$ROOT/policies"
		URL=http://$ADDR/api/route
		;;
	cerbos)
		local http grpc _
		http=127.0.0.1:$(free_port)
		grpc=127.0.0.1:$(free_port)
		spawn "$log" env HALL_BENCH_CERBOS_HTTP="$http" HALL_BENCH_CERBOS_GRPC="$grpc" \
			HALL_BENCH_CERBOS_POLICIES="$PEER_DIR/cerbos/policies" HALL_BENCH_CERBOS_AUDIT="$WORK/cerbos-audit-$round" \
			"$CERBOS" server --config="$PEER_DIR/cerbos/conf.yaml" --debug-listen-addr=127.0.0.1:0 --log-level=warn
		for _ in $(seq 1 1000); do
			curl -fsS "http://$http/_cerbos/health" >/dev/null 2>&1 && break
			kill -0 "$PID" 2>/dev/null || break
			sleep 0.02
		done
		curl -fsS "http://$http/_cerbos/health" >/dev/null 2>&1 || {
			echo "Cerbos did not start: $(tail -n 20 "$log")" >&2
			return 1
		}
		URL=http://$http/api/check/resources
		BODY=$PEER_DIR/cerbos/request.json
		;;
	pyhall)
		spawn "$log" "$PYTHON" "$PEER_DIR/pyhall_app.py"
		wait_listening "$log" || {
			echo "the PyHall app did not start: $(tail -n 20 "$log")" >&2
			return 1
		}
		URL=http://$ADDR/api/route
		;;
	esac
}

# peer_allowed SYSTEM: 0 when SYSTEM answers the request with "allowed" (and the expected
# rule/worker); else prints the answer and fails.
peer_allowed() {
	local auth=() answer filter
	[ -z "$TOKEN" ] || auth=(-H "Authorization: Bearer $TOKEN")
	answer=$(curl -sS -w '\n%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' --data-binary "@$BODY" "$URL" 2>&1) || true
	case $1 in
	floor | floor-*) filter='.allowed == true' ;;
	durable | batched) filter='.allowed == true and .rule_id == "docs-quickstart" and .worker_id == "worker.doc.summarize"' ;;
	cerbos) filter='.results[0].actions.route == "EFFECT_ALLOW" and .results[0].outputs[0].val.worker_id == "worker.doc.summarize"' ;;
	pyhall) filter='.denied == false and .matched_rule_id == "docs-quickstart" and .selected_worker_species_id == "wrk.doc.summarize"' ;;
	esac
	if [ "$(tail -n1 <<<"$answer")" = 200 ] && [ "$(sed '$d' <<<"$answer" | jq "$filter" 2>/dev/null)" = true ]; then
		return 0
	fi
	echo "$1 did not answer \"allowed\" (HTTP status last): $answer" >&2
	return 1
}

# proc_ticks PID: utime+stime of every thread of PID plus its waited-for children (cutime,
# cstime), in clock ticks. Fields 14-17 of /proc/PID/stat; the command name (field 2) may hold
# spaces, so count from after its closing parenthesis.
proc_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13 + $14 + $15}'; }

# peer_bench CONNS SECS: wrk on URL; prints "rps p50_us p99_us p999_us non2xx errors requests
# cpu_ticks" (empty when wrk printed no result).
peer_bench() {
	local threads=$(($1 < 2 ? $1 : 2)) t0 t1 out
	t0=$(proc_ticks "$PID")
	out=$(BENCH_PATH=/${URL#http://*/} BENCH_BODY_FILE=$BODY BENCH_TOKEN=$TOKEN \
		wrk -t"$threads" -c"$1" -d"$2s" --timeout 5s --latency -s "$ROOT/bench/peer.lua" "$URL" |
		sed -n 's/^RESULT //p') || true
	t1=$(proc_ticks "$PID")
	[ -n "$out" ] && echo "$out $((t1 - t0))"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

peer_section() {
	local systems=(floor) mode p
	# A durable answer cannot cost less than an append and a sync: those floors join durable.
	case " $MODES " in *" durable "*) systems+=(floor-sync floor-group floor-sled floor-sled-group) ;; esac
	for mode in $MODES; do systems+=("$mode"); done
	for p in $PEERS; do
		case $p in
		cerbos) setup_cerbos && systems+=(cerbos) ;;
		pyhall) setup_pyhall && systems+=(pyhall) ;;
		esac
	done
	printf '%s' "$HALL_BODY" >"$WORK/hall-body.json"

	# Per cell (system|conns): the values of each round, and the errors summed over rounds.
	declare -A rps p50 p99 p999 cpu non2xx errs refused
	local round sys c r key k
	for round in $(seq 1 "$ROUNDS"); do
		[ "$ROUNDS" = 1 ] || echo "== peers: round $round of $ROUNDS"
		for sys in "${systems[@]}"; do
			if ! peer_start "$sys" "$round"; then
				refused[$sys]="did not start (round $round)"
				stop "$PID"
				continue
			fi
			if ! peer_allowed "$sys"; then
				refused[$sys]="did not answer \"allowed\" before the load"
				stop "$PID"
				continue
			fi
			peer_bench 16 2 >/dev/null # warm-up
			for c in $CONNS; do
				key=$sys\|$c
				read -r -a r <<<"$(peer_bench "$c" "$DURATION")"
				if [ ${#r[@]} -ne 8 ]; then
					refused[$key]="wrk printed no result"
					continue
				fi
				rps[$key]+=" ${r[0]}"
				p50[$key]+=" ${r[1]}"
				p99[$key]+=" ${r[2]}"
				p999[$key]+=" ${r[3]}"
				non2xx[$key]=$((${non2xx[$key]:-0} + r[4]))
				errs[$key]=$((${errs[$key]:-0} + r[5]))
				if [ "${r[6]}" -gt 0 ]; then
					cpu[$key]+=" $(awk -v t="${r[7]}" -v hz="$CLK_TCK" -v n="${r[6]}" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')"
				else
					refused[$key]="no request completed"
				fi
			done
			peer_allowed "$sys" || refused[$sys]="did not answer \"allowed\" after the load"
			stop "$PID"
		done
	done

	local name
	echo
	echo "Peer comparison: one allowed request ($HALL_BODY and its equivalents), wrk ${DURATION} s per"
	echo "row after a 2 s warm-up, $ROUNDS round(s), median per cell; CPU = server utime+stime ÷ requests (CLK_TCK $CLK_TCK)."
	echo
	echo "| system | conns | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | non-2xx | socket errors |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
	local notes=() bad=0
	for sys in "${systems[@]}"; do
		case $sys in
		floor) name="floor (bare actix)" ;;
		floor-sync) name="floor + append & sync per request" ;;
		floor-group) name="floor + group-committed sync" ;;
		floor-sled) name="floor + sled insert & flush per request" ;;
		floor-sled-group) name="floor + sled group commit" ;;
		durable | batched) name="Hall, $sys audit" ;;
		cerbos) name="Cerbos $("$CERBOS" --version | head -n1), local audit" ;;
		pyhall) name="PyHall $("$PYTHON" -c 'import pyhall; print(pyhall.__version__)') (Flask $("$PYTHON" -c 'from importlib.metadata import version; print(version("flask"))'))" ;;
		esac
		for c in $CONNS; do
			key=$sys\|$c
			k=${refused[$key]:-${refused[$sys]:-}}
			if [ -z "$k" ] && [ $((${non2xx[$key]:-0} + ${errs[$key]:-0})) -gt 0 ]; then
				k="answers were errors"
			fi
			# shellcheck disable=SC2086 # the per-round values are a space-separated list
			if [ -z "$k" ]; then
				printf '| %s | %s | %.0f | %s | %s | %s | %.0f | 0 | 0 |\n' "$name" "$c" "$(median ${rps[$key]})" \
					"$(fmt_ms "$(median ${p50[$key]})")" "$(fmt_ms "$(median ${p99[$key]})")" \
					"$(fmt_ms "$(median ${p999[$key]})")" "$(median ${cpu[$key]})"
			else
				printf '| %s | %s | — | — | — | — | — | %s | %s |\n' "$name" "$c" "${non2xx[$key]:-?}" "${errs[$key]:-?}"
				notes+=("$name at $c connections NOT REPORTED: $k")
				bad=1
			fi
		done
	done
	echo
	if [ ${#notes[@]} -gt 0 ] || [ ${#SKIPPED[@]} -gt 0 ]; then
		printf '!!! %s\n' "${notes[@]}" "${SKIPPED[@]}"
	fi
	return "$bad"
}

# ---------------------------------------------------------------------------------------------
status=0
[ "$RUN_MAIN" = 0 ] || main_section
if [ "$RUN_PEERS" = 1 ]; then
	peer_section || status=1
fi
exit "$status"
