#!/usr/bin/env bash
# .ci/service-checks.sh — checks the service packaging: install.sh, systemd/, launchd/.
#
# - shellcheck on install.sh, .ci/*.sh and bench/*.sh
# - `systemd-analyze verify` on both units as install.sh renders them (ExecStart= naming a real,
#   installed binary). verify exits 0 on unknown keys and bad values and only prints a warning,
#   so any output at all counts as a failure here.
# - the LaunchAgent template and the plist install.sh renders parse (plistlib) and hold the keys
# - install.sh --prefix TMP: builds once (cargo build --release --locked; set HALL_CI_BINARY to
#   reuse a release binary CI already built), installs, `hall check` passes on the installed
#   config, a second run changes nothing (checksums, modes, mtimes), edited policy files are
#   kept, the service is installed/enabled/removed through a stub systemctl/launchctl, and
#   --uninstall keeps config and state unless --purge.
#
# Needs: bash, python3, shellcheck, systemd-analyze. As root with apt it installs the missing
# Debian packages (shellcheck, systemd); otherwise it stops and says what is missing.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok    %s\n' "$*"; }
skip() { printf 'SKIP  %s\n' "$*"; }
fail() {
	printf 'FAIL  %s\n' "$*" >&2
	exit 1
}

# ---------------------------------------------------------------------------------------------
step "tools"
missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	else
		fail "missing Debian packages: ${missing[*]} (apt-get install ${missing[*]}; run as root to let this script do it)"
	fi
fi
for tool in shellcheck systemd-analyze python3 sha256sum; do
	command -v "$tool" >/dev/null 2>&1 || fail "$tool not found"
done
ok "shellcheck $(shellcheck --version | sed -n 's/^version: //p'), $(systemd-analyze --version | head -n1)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hall-service-checks.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------------------------
step "shellcheck"
shellcheck install.sh .ci/*.sh bench/*.sh
ok "shellcheck install.sh .ci/*.sh bench/*.sh"

# ---------------------------------------------------------------------------------------------
step "binary"
if [ -n "${HALL_CI_BINARY:-}" ]; then
	[ -x "$HALL_CI_BINARY" ] || fail "HALL_CI_BINARY=$HALL_CI_BINARY is not executable"
	BINARY=$HALL_CI_BINARY
	ok "reusing $BINARY (HALL_CI_BINARY)"
else
	# The one real build, through install.sh itself (honours CARGO_TARGET_DIR).
	./install.sh --prefix "$WORK/built" --no-service | tee "$WORK/build.out"
	grep -q '^  built ' "$WORK/build.out" || fail "install.sh did not build"
	BINARY=$WORK/built/bin/hall
	cmp -s "$BINARY" "${CARGO_TARGET_DIR:-$ROOT/target}/release/hall" ||
		fail "installed binary differs from the release build"
	ok "install.sh built and installed $BINARY"
fi

# install.sh copies registry/ and policies/ from the directory it lives in. On a branch
# without them, run a copy of the packaging next to a tiny example set instead.
if [ -d "$ROOT/registry" ] && [ -d "$ROOT/policies" ]; then
	SRC=$ROOT
else
	SRC=$WORK/src
	mkdir -p "$SRC/registry" "$SRC/policies"
	cp -R "$ROOT/install.sh" "$ROOT/systemd" "$ROOT/launchd" "$SRC/"
	cat >"$SRC/registry/docs.toml" <<'EOF'
[[capability]]
id = "cap.doc.summarize"
description = "Summarize a document"

[[worker]]
id = "worker.doc.summarize"
capabilities = ["cap.doc.summarize"]
environments = ["dev", "staging", "prod"]
max_data_label = "CONFIDENTIAL"
blast_radius = 1
EOF
	cat >"$SRC/policies/10-docs.toml" <<'EOF'
[settings]
environments = ["dev", "staging", "prod"]
data_labels  = ["PUBLIC", "INTERNAL", "CONFIDENTIAL", "SECRET"]

[[rule]]
id = "docs-dev"
capabilities = ["cap.doc.*"]
envs = ["dev", "staging"]
max_data_label = "INTERNAL"
effect = "allow"
workers = ["worker.doc.summarize"]
EOF
	skip "registry/ or policies/ missing in $ROOT: using a temporary copy with a minimal example set"
fi
INSTALL=("$SRC/install.sh")
export HALL_INSTALL_SKIP_BUILD=1 HALL_BINARY=$BINARY

# Stubs standing in for systemctl and launchctl: they log each call and remember enable/load,
# so install.sh's service steps run for real without a running service manager.
STUB=$WORK/stub
CALLS=$WORK/calls.log
mkdir -p "$STUB"
: >"$CALLS"
cat >"$STUB/systemctl" <<EOF
#!/usr/bin/env bash
echo "systemctl \$*" >>'$CALLS'
args=" \$* "
case \$args in
*" is-enabled "* | *" is-active "*) [ -e '$WORK/enabled' ] ;;
*" enable "*) touch '$WORK/enabled' ;;
*" disable "*) rm -f '$WORK/enabled' ;;
esac
EOF
cat >"$STUB/launchctl" <<EOF
#!/usr/bin/env bash
echo "launchctl \$*" >>'$CALLS'
case \$1 in
print) [ -e '$WORK/loaded' ] ;;
bootstrap) touch '$WORK/loaded' ;;
bootout) [ -e '$WORK/loaded' ] && rm -f '$WORK/loaded' ;;
esac
EOF
chmod +x "$STUB/systemctl" "$STUB/launchctl"

# Fails if install.sh's output names a step that changed something.
no_changes() {
	if grep -E '^  (installed|updated|created|removed|enabled|started|restarted|reloaded|loaded|stopped|built) ' "$1"; then
		fail "$2: second run changed something (lines above)"
	fi
}

# Every path under a tree with its type, mode, size, mtime and content hash.
snapshot() {
	(cd "$1" && find . -printf '%y %m %s %T@ %p\n' | sort)
	(cd "$1" && find . -type f -exec sha256sum {} + | sort -k2)
}

# ---------------------------------------------------------------------------------------------
step "install.sh --prefix --no-service"
P=$WORK/prefix
"${INSTALL[@]}" --prefix "$P" --no-service | tee "$WORK/install1.out"
[ -x "$P/bin/hall" ] || fail "no $P/bin/hall"
cmp -s "$P/bin/hall" "$BINARY" || fail "$P/bin/hall is not the built binary"
for f in hall.toml .install-manifest; do [ -f "$P/etc/hall/$f" ] || fail "no $P/etc/hall/$f"; done
diff -r "$SRC/registry" "$P/etc/hall/registry" || fail "registry/ not copied"
diff -r "$SRC/policies" "$P/etc/hall/policies" || fail "policies/ not copied"
grep -qx "state_dir = \"$P/var/lib/hall\"" "$P/etc/hall/hall.toml" || fail "hall.toml state_dir"
grep -qx "policies_dir = \"$P/etc/hall/policies\"" "$P/etc/hall/hall.toml" || fail "hall.toml policies_dir"
[ "$(stat -c %a "$P/var/lib/hall")" = 700 ] || fail "state dir is not 0700"
[ "$(stat -c %a "$P/etc/hall/hall.toml")" = 600 ] || fail "user hall.toml is not 0600"
for f in share/man/man1/hall.1 share/bash-completion/completions/hall share/zsh/site-functions/_hall share/fish/vendor_completions.d/hall.fish; do
	[ -s "$P/$f" ] || fail "no $P/$f"
done
grep -q '^\.TH' "$P/share/man/man1/hall.1" || fail "hall.1 is not a man page"
grep -q 'complete' "$P/share/bash-completion/completions/hall" || fail "bash completion looks empty"
ok "binary, config, examples and state dir, man page and completions under $P"

step "hall check on the installed config"
# On a branch where the CLI is not written yet the binary does nothing; these checks need main.
if version=$("$P/bin/hall" version 2>/dev/null) && [ -n "$version" ]; then
	"$P/bin/hall" check --config "$P/etc/hall/hall.toml" || fail "hall check rejected the installed config"
	ok "hall check --config $P/etc/hall/hall.toml exits 0 ($version)"
	broken=$WORK/broken-policies
	cp -R "$P/etc/hall/policies" "$broken"
	printf '[[rule]\nid = \n' >"$broken/zz-broken.toml"
	set +e
	"$P/bin/hall" check --config "$P/etc/hall/hall.toml" --policies "$broken" >"$WORK/broken.out" 2>&1
	rc=$?
	set -e
	[ "$rc" = 1 ] || fail "hall check on a broken policy file exited $rc, expected 1"
	grep -q 'zz-broken.toml' "$WORK/broken.out" || fail "hall check did not name the broken file"
	ok "hall check exits 1 and names the file on a broken policy"
else
	skip "hall check: '$P/bin/hall version' prints nothing: the CLI is not on this branch yet (needs main)"
fi

step "second run changes nothing, edited files are kept"
printf '\n# edited by the user\n' >>"$P/etc/hall/hall.toml"
first_policy=$(find "$P/etc/hall/policies" -name '*.toml' | sort | head -n1)
printf '\n# edited by the user\n' >>"$first_policy"
first_registry=$(find "$P/etc/hall/registry" -name '*.toml' | sort | head -n1)
rm -f "$first_registry" # a deleted example must not come back
snapshot "$P" >"$WORK/before"
sleep 1 # so a rewrite would show in the mtimes even on coarse clocks
"${INSTALL[@]}" --prefix "$P" --no-service | tee "$WORK/install2.out"
snapshot "$P" >"$WORK/after"
diff "$WORK/before" "$WORK/after" || fail "second run changed files under $P"
no_changes "$WORK/install2.out" "--no-service"
grep -q '^  unchanged  binary ' "$WORK/install2.out" || fail "second run did not report the binary unchanged"
ok "identical tree (checksums, modes, mtimes), every step unchanged/kept, edits and deletion kept"

step "the summary prints the listen address of the config in force"
grep -q '^  daemon   http://127.0.0.1:8765 ' "$WORK/install2.out" || fail "summary does not print the default address"
sed -i 's/^listen = .*/listen = "localhost:8799"/' "$P/etc/hall/hall.toml"
"${INSTALL[@]}" --prefix "$P" --no-service >"$WORK/install-listen.out"
grep -q '^  daemon   http://127.0.0.1:8799 ' "$WORK/install-listen.out" || fail "summary ignores the edited listen"
if grep -q 'or SIGHUP) or restart' "$P/etc/hall/hall.toml"; then
	fail "generated hall.toml still says a reload applies config edits"
fi
grep -q 're-reads the registry and policy files only' "$P/etc/hall/hall.toml" ||
	fail "generated hall.toml does not say what a reload re-reads"
sed -i 's/^listen = .*/listen = "127.0.0.1:8765"/' "$P/etc/hall/hall.toml"
ok "summary shows http://127.0.0.1:8799 after listen was edited"

# ---------------------------------------------------------------------------------------------
step "systemd user unit: install, verify, idempotent"
export HALL_SERVICE_MANAGER=systemd HALL_UNIT_DIR=$WORK/units/user
PATH=$STUB:$PATH "${INSTALL[@]}" --prefix "$P" | tee "$WORK/user1.out"
UNIT=$HALL_UNIT_DIR/hall.service
[ -f "$UNIT" ] || fail "no unit at $UNIT"
grep -qx "ExecStart=$P/bin/hall serve --config $P/etc/hall/hall.toml" "$UNIT" || fail "ExecStart= not rewritten"
grep -qx "Environment=HALL_STATE_DIR=$P/var/lib/hall HALL_KEYRING=off" "$UNIT" || fail "HALL_STATE_DIR not rewritten"
grep -qx "ReadWritePaths=$P/var/lib/hall" "$UNIT" || fail "ReadWritePaths= not rewritten"
grep -q '%h' "$UNIT" && fail "unrewritten %h left in $UNIT"
grep -qx 'systemctl --user daemon-reload' "$CALLS" || fail "no daemon-reload"
grep -qx 'systemctl --user enable --now hall.service' "$CALLS" || fail "not enabled"
mkdir -m 0700 "$WORK/xdg-runtime"
if ! XDG_RUNTIME_DIR=$WORK/xdg-runtime systemd-analyze verify --user --man=no "$UNIT" >"$WORK/verify-user.out" 2>&1 ||
	[ -s "$WORK/verify-user.out" ]; then
	cat "$WORK/verify-user.out"
	fail "systemd-analyze verify --user $UNIT"
fi
ok "systemd-analyze verify --user: clean (ExecStart=$P/bin/hall exists)"
: >"$CALLS"
snapshot "$WORK/units" >"$WORK/units-before"
PATH=$STUB:$PATH "${INSTALL[@]}" --prefix "$P" | tee "$WORK/user2.out"
snapshot "$WORK/units" >"$WORK/units-after"
diff "$WORK/units-before" "$WORK/units-after" || fail "second run rewrote the unit"
no_changes "$WORK/user2.out" "systemd user"
if grep -E ' (enable|restart|start|daemon-reload)( |$)' "$CALLS"; then fail "second run touched the service"; fi
ok "second run: unit untouched, no enable/restart"

step "systemd system unit: verify"
mkdir -p "$WORK/units/system"
HALL_SERVICE_MANAGER=systemd "${INSTALL[@]}" --system --prefix "$P" --print-unit >"$WORK/units/system/hall.service"
if ! systemd-analyze verify --man=no "$WORK/units/system/hall.service" >"$WORK/verify-system.out" 2>&1 ||
	[ -s "$WORK/verify-system.out" ]; then
	cat "$WORK/verify-system.out"
	fail "systemd-analyze verify $WORK/units/system/hall.service"
fi
# The rendered unit is the repository's unit with only ExecStart= changed.
diff <(grep -v '^ExecStart=' systemd/hall.service) <(grep -v '^ExecStart=' "$WORK/units/system/hall.service") ||
	fail "install.sh changed more than ExecStart= in the system unit"
# shellcheck disable=SC2016 # $MAINPID is systemd's, not ours
for key in Type=notify DynamicUser=yes ProtectSystem=strict IPAddressDeny=any IPAddressAllow=localhost \
	StateDirectory=hall NoNewPrivileges=yes 'ExecReload=/bin/kill -HUP $MAINPID'; do
	grep -qxF "$key" systemd/hall.service || fail "systemd/hall.service lacks $key"
done
ok "systemd-analyze verify: clean; hardening keys present"

# ---------------------------------------------------------------------------------------------
step "launchd plist"
python3 - "$ROOT/launchd/dev.hall.agent.plist" <<'EOF'
import plistlib, sys
p = plistlib.load(open(sys.argv[1], "rb"))
for k in ("Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "StandardOutPath",
          "StandardErrorPath", "WorkingDirectory", "EnvironmentVariables"):
    assert k in p, f"template lacks {k}"
assert p["ProgramArguments"][1:3] == ["serve", "--config"], p["ProgramArguments"]
assert p["RunAtLoad"] is True and p["KeepAlive"] is True
assert "HALL_STATE_DIR" in p["EnvironmentVariables"]
EOF
ok "template parses and holds the keys"
# Install it (paths with a space and an ampersand, like "Application Support") via a stub.
PL="$WORK/mac prefix & co"
HALL_SERVICE_MANAGER=launchd HALL_UNIT_DIR=$WORK/LaunchAgents PATH=$STUB:$PATH \
	"${INSTALL[@]}" --prefix "$PL" | tee "$WORK/launchd1.out"
python3 - "$WORK/LaunchAgents/dev.hall.agent.plist" "$PL" <<'EOF'
import plistlib, sys
path, prefix = sys.argv[1], sys.argv[2]
raw = open(path, "rb").read()
assert b"@HALL_" not in raw, "placeholder left"
p = plistlib.loads(raw)
assert p["Label"] == "dev.hall.agent"
assert p["ProgramArguments"] == [f"{prefix}/bin/hall", "serve", "--config", f"{prefix}/etc/hall/hall.toml"], p["ProgramArguments"]
assert p["EnvironmentVariables"] == {"HALL_STATE_DIR": f"{prefix}/var/lib/hall"}
assert p["WorkingDirectory"] == f"{prefix}/var/lib/hall"
assert p["StandardOutPath"].startswith(f"{prefix}/var/log/hall/")
assert p["StandardErrorPath"].startswith(f"{prefix}/var/log/hall/")
EOF
grep -q "^launchctl bootstrap gui/$(id -u) $WORK/LaunchAgents/dev.hall.agent.plist" "$CALLS" || fail "LaunchAgent not bootstrapped"
HALL_SERVICE_MANAGER=launchd HALL_UNIT_DIR=$WORK/LaunchAgents PATH=$STUB:$PATH \
	"${INSTALL[@]}" --prefix "$PL" | tee "$WORK/launchd2.out"
no_changes "$WORK/launchd2.out" "launchd"
HALL_SERVICE_MANAGER=launchd HALL_UNIT_DIR=$WORK/LaunchAgents PATH=$STUB:$PATH \
	"${INSTALL[@]}" --prefix "$PL" --uninstall --purge
if [ -e "$WORK/LaunchAgents/dev.hall.agent.plist" ] || [ -e "$PL/etc/hall" ]; then fail "launchd purge left files"; fi
ok "rendered plist parses with real paths; installed, unchanged on rerun, purged"

# ---------------------------------------------------------------------------------------------
step "--uninstall keeps config and state; --purge removes them"
: >"$CALLS"
PATH=$STUB:$PATH "${INSTALL[@]}" --prefix "$P" --uninstall | tee "$WORK/uninstall1.out"
[ ! -e "$P/bin/hall" ] || fail "binary left behind"
[ ! -e "$UNIT" ] || fail "unit left behind"
[ ! -e "$P/share/man/man1/hall.1" ] || fail "man page left behind"
[ ! -e "$P/share/bash-completion/completions/hall" ] || fail "bash completion left behind"
grep -qx 'systemctl --user disable --now hall.service' "$CALLS" || fail "service not disabled"
if [ ! -f "$P/etc/hall/hall.toml" ] || [ ! -d "$P/etc/hall/policies" ] || [ ! -d "$P/var/lib/hall" ]; then
	fail "--uninstall removed config or state"
fi
grep -q '# edited by the user' "$P/etc/hall/hall.toml" || fail "hall.toml lost the user's edit"
PATH=$STUB:$PATH "${INSTALL[@]}" --prefix "$P" --uninstall | tee "$WORK/uninstall2.out"
if grep -E '^  removed ' "$WORK/uninstall2.out"; then fail "second --uninstall removed something"; fi
PATH=$STUB:$PATH "${INSTALL[@]}" --prefix "$P" --uninstall --purge
if [ -e "$P/etc/hall" ] || [ -e "$P/var/lib/hall" ]; then fail "--purge left config or state"; fi
ok "uninstall removed binary and unit, kept config+state; purge removed them"

printf '\nall service checks passed\n'
