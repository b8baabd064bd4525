#!/usr/bin/env bash
# install.sh — build and install Hall, its example policy files and its service.
#
# Runs with the bash that ships with macOS (3.2) as well as Linux. See `./install.sh --help`
# and docs/service.md. Every step prints what it did: installed, updated, unchanged, kept,
# removed, skipped. A second run with the same options changes nothing.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: ./install.sh [--user | --system] [--prefix DIR] [--no-service]
       ./install.sh [--user | --system] [--prefix DIR] --uninstall [--purge]

Builds Hall (cargo build --release --locked), installs the binary, copies the example
registry/ and policies/ into the config dir, writes hall.toml if there is none, and installs
and starts the service (systemd on Linux, a LaunchAgent on macOS).

  --user         for you only (default): systemd user unit or LaunchAgent
  --system       for the whole machine: systemd system unit (root; Linux only)
  --prefix DIR   install under DIR (default ~/.local for --user, /usr/local for --system);
                 config and state then live under DIR too (DIR/etc/hall, DIR/var/lib/hall)
  --no-service   install the files only; no unit, nothing started
  --uninstall    stop and remove the service and the binary; keep config and state
  --purge        with --uninstall (implies it): also delete config (your policies!) and state
  --print-unit   print the unit/plist that would be installed, then exit
  -h, --help     this help

Layout (Linux --user / Linux --system / macOS --user / any --prefix P):
  binary   ~/.local/bin/hall      /usr/local/bin/hall  ~/.local/bin/hall                     P/bin/hall
  man, completions  <prefix>/share/{man/man1/hall.1, bash-completion/completions/hall,
           zsh/site-functions/_hall, fish/vendor_completions.d/hall.fish} (prefix ~/.local for --user)
  config   ~/.config/hall         /etc/hall            ~/Library/Application Support/hall    P/etc/hall
  state    ~/.local/share/hall    /var/lib/hall        ~/Library/Application Support/hall/state
                                                                                             P/var/lib/hall
  (~/.config and ~/.local/share follow $XDG_CONFIG_HOME and $XDG_DATA_HOME. A --system
  service always keeps its state in /var/lib/hall: systemd owns it via StateDirectory=.)
The config dir holds hall.toml, registry/, policies/ and .install-manifest, the list of what
this script installed; --uninstall removes exactly what it lists.

Policy files are never overwritten: registry/ and policies/ are copied only when the config
dir has no directory of that name at all; an existing one is left exactly as it is (so an
example you deleted does not come back). hall.toml is written only when absent.

Environment:
  CARGO_TARGET_DIR          where cargo builds (honoured; default ./target)
  HALL_INSTALL_SKIP_BUILD=1 with HALL_BINARY=PATH: install that binary instead of building
  HALL_SERVICE_MANAGER      systemd | launchd | none: skip detection (tests)
  HALL_UNIT_DIR             install the unit/plist in this directory instead (tests)
EOF
}

die() {
	printf 'install.sh: error: %s\n' "$*" >&2
	exit 1
}

usage_error() {
	printf 'install.sh: %s (see --help)\n' "$*" >&2
	exit 2
}

# One line per step: what happened, then to what.
say() {
	printf '  %-10s %s\n' "$1" "$2"
}

# Escape a string for the replacement side of a sed s||| command.
sed_escape() {
	printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'
}

# Escape a string for an XML text node (the plist).
xml_escape() {
	printf '%s' "$1" | sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g'
}

# Escape a string for a TOML basic string.
toml_escape() {
	printf '%s' "$1" | sed -e 's/[\\"]/\\&/g'
}

# Paths go into unit files unquoted and into a tab-separated manifest: refuse anything that
# systemd would treat specially (spaces, quotes, %, $, \) rather than escape it subtly wrong.
check_unit_path() {
	case $1 in
	/*) ;;
	*) die "not an absolute path: $1" ;;
	esac
	if printf '%s' "$1" | LC_ALL=C grep -q '[^A-Za-z0-9._/+@:,=-]'; then
		die "path '$1' contains characters install.sh will not write into a systemd unit; use another --prefix"
	fi
}

check_manifest_path() {
	case $1 in
	*"$TAB"* | *"$NL"*) die "path contains a tab or newline: $1" ;;
	esac
}

TAB=$(printf '\t')
NL='
'

# ---------------------------------------------------------------------------------------------
# Options

SCOPE=user
PREFIX=
NO_SERVICE=0
UNINSTALL=0
PURGE=0
PRINT_UNIT=0
while [ $# -gt 0 ]; do
	case $1 in
	--user) SCOPE=user ;;
	--system) SCOPE=system ;;
	--prefix)
		[ $# -ge 2 ] || usage_error "--prefix needs a directory"
		PREFIX=$2
		shift
		;;
	--prefix=*) PREFIX=${1#--prefix=} ;;
	--no-service) NO_SERVICE=1 ;;
	--uninstall) UNINSTALL=1 ;;
	--purge)
		PURGE=1
		UNINSTALL=1
		;;
	--print-unit) PRINT_UNIT=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*) usage_error "unknown option: $1" ;;
	esac
	shift
done
if [ "${PREFIX+set}" = set ] && [ -n "$PREFIX" ]; then
	case $PREFIX in
	/*) ;;
	*) PREFIX=$PWD/$PREFIX ;;
	esac
	# Strip trailing slashes (but keep "/").
	while [ "${#PREFIX}" -gt 1 ] && [ "${PREFIX%/}" != "$PREFIX" ]; do PREFIX=${PREFIX%/}; done
	PREFIX_GIVEN=1
else
	PREFIX_GIVEN=0
fi

SRC_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
OS=$(uname -s)
[ -n "${HOME:-}" ] || die "HOME is not set"

# ---------------------------------------------------------------------------------------------
# Service manager and layout

if [ -n "${HALL_SERVICE_MANAGER:-}" ]; then
	MANAGER=$HALL_SERVICE_MANAGER
	case $MANAGER in
	systemd | launchd | none) ;;
	*) usage_error "HALL_SERVICE_MANAGER must be systemd, launchd or none" ;;
	esac
elif [ "$OS" = Darwin ]; then
	MANAGER=launchd
elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
	MANAGER=systemd
else
	MANAGER=none
fi
if [ "$NO_SERVICE" = 1 ]; then
	SERVICE=none
else
	SERVICE=$MANAGER
fi
if [ "$SCOPE" = system ] && [ "$SERVICE" = launchd ]; then
	die "--system: Hall ships a LaunchAgent (per user) for macOS; run without --system"
fi

if [ "$PREFIX_GIVEN" = 1 ]; then
	CONFIG_DIR=$PREFIX/etc/hall
	STATE_DIR=$PREFIX/var/lib/hall
	LOG_DIR=$PREFIX/var/log/hall
elif [ "$SCOPE" = system ]; then
	PREFIX=/usr/local
	CONFIG_DIR=/etc/hall
	STATE_DIR=/var/lib/hall
	LOG_DIR=/var/log/hall
elif [ "$OS" = Darwin ]; then
	PREFIX=$HOME/.local
	CONFIG_DIR="$HOME/Library/Application Support/hall"
	STATE_DIR=$CONFIG_DIR/state
	LOG_DIR=$HOME/Library/Logs/hall
else
	PREFIX=$HOME/.local
	CONFIG_DIR=${XDG_CONFIG_HOME:-$HOME/.config}/hall
	STATE_DIR=${XDG_DATA_HOME:-$HOME/.local/share}/hall
	LOG_DIR=
fi
# A system service's state dir belongs to systemd (StateDirectory=hall, DynamicUser=yes).
SYSTEMD_OWNS_STATE=0
if [ "$SCOPE" = system ] && [ "$SERVICE" = systemd ]; then
	STATE_DIR=/var/lib/hall
	SYSTEMD_OWNS_STATE=1
fi
BIN=$PREFIX/bin/hall
CONFIG_FILE=$CONFIG_DIR/hall.toml
MANIFEST=$CONFIG_DIR/.install-manifest
for p in "$BIN" "$CONFIG_DIR" "$STATE_DIR"; do check_manifest_path "$p"; done

LABEL=dev.hall.agent
if [ "$SCOPE" = system ]; then
	UNIT_DIR=${HALL_UNIT_DIR:-/etc/systemd/system}
	UNIT_TEMPLATE=$SRC_DIR/systemd/hall.service
else
	UNIT_DIR=${HALL_UNIT_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user}
	UNIT_TEMPLATE=$SRC_DIR/systemd/hall-user.service
fi
UNIT=$UNIT_DIR/hall.service
PLIST_DIR=${HALL_UNIT_DIR:-$HOME/Library/LaunchAgents}
PLIST=$PLIST_DIR/$LABEL.plist
PLIST_TEMPLATE=$SRC_DIR/launchd/$LABEL.plist

systemctl_scoped() {
	if [ "$SCOPE" = system ]; then
		systemctl "$@"
	else
		systemctl --user "$@"
	fi
}

# Config files must be readable by the system service's dynamic user; a user's own files
# are private to them.
if [ "$SCOPE" = system ]; then
	umask 022
	CONF_DIR_MODE=0755
	CONF_FILE_MODE=0644
else
	umask 077
	CONF_DIR_MODE=0700
	CONF_FILE_MODE=0600
fi

# ---------------------------------------------------------------------------------------------
# Rendering: the repository's unit/plist with this install's paths in it.

render_systemd_unit() {
	[ -f "$UNIT_TEMPLATE" ] || die "missing $UNIT_TEMPLATE"
	check_unit_path "$BIN"
	check_unit_path "$CONFIG_FILE"
	local exec
	exec="ExecStart=$BIN serve --config $CONFIG_FILE"
	if [ "$SCOPE" = system ]; then
		sed -e "s|^ExecStart=.*|$(sed_escape "$exec")|" "$UNIT_TEMPLATE"
	else
		check_unit_path "$STATE_DIR"
		# The template names the default state dir; ConfigurationDirectory= only fits the
		# default config dir.
		if [ "$PREFIX_GIVEN" = 1 ]; then
			sed -e "s|^ExecStart=.*|$(sed_escape "$exec")|" \
				-e "s|%h/\.local/share/hall|$(sed_escape "$STATE_DIR")|g" \
				-e '/^ConfigurationDirectory=/d' "$UNIT_TEMPLATE"
		else
			sed -e "s|^ExecStart=.*|$(sed_escape "$exec")|" \
				-e "s|%h/\.local/share/hall|$(sed_escape "$STATE_DIR")|g" "$UNIT_TEMPLATE"
		fi
	fi
}

render_plist() {
	[ -f "$PLIST_TEMPLATE" ] || die "missing $PLIST_TEMPLATE"
	sed -e "s|@HALL_BIN@|$(sed_escape "$(xml_escape "$BIN")")|g" \
		-e "s|@HALL_CONFIG@|$(sed_escape "$(xml_escape "$CONFIG_FILE")")|g" \
		-e "s|@HALL_STATE_DIR@|$(sed_escape "$(xml_escape "$STATE_DIR")")|g" \
		-e "s|@HALL_WORKDIR@|$(sed_escape "$(xml_escape "$STATE_DIR")")|g" \
		-e "s|@HALL_LOG_DIR@|$(sed_escape "$(xml_escape "$LOG_DIR")")|g" \
		"$PLIST_TEMPLATE"
}

render_service() {
	case $MANAGER in
	systemd) render_systemd_unit ;;
	launchd) render_plist ;;
	*) die "no service manager detected (set HALL_SERVICE_MANAGER=systemd or launchd)" ;;
	esac
}

if [ "$PRINT_UNIT" = 1 ]; then
	render_service
	exit 0
fi

# ---------------------------------------------------------------------------------------------
# File helpers. CHANGED is 1 after a helper wrote something, 0 when it found nothing to do.

CHANGED=0

# Install SRC as DEST (mode MODE) unless DEST already has the same bytes. The copy goes to a
# temporary name first and is renamed over DEST, so a running binary is never overwritten.
install_file() {
	local src=$1 dest=$2 mode=$3 what=$4 verb=installed
	if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
		say unchanged "$what $dest"
		CHANGED=0
		return 0
	fi
	[ -e "$dest" ] && verb=updated
	mkdir -p "$(dirname -- "$dest")"
	cp "$src" "$dest.tmp.$$"
	chmod "$mode" "$dest.tmp.$$"
	mv -f "$dest.tmp.$$" "$dest"
	say "$verb" "$what $dest"
	CHANGED=1
}

# Write the text on stdin to DEST unless DEST already holds exactly that text. (Called at the end
# of a pipeline, i.e. in a subshell: CHANGED does not reach the caller.)
install_text() {
	local dest=$1 mode=$2 what=$3 tmp
	tmp=$(mktemp "${TMPDIR:-/tmp}/hall-install.XXXXXX")
	cat >"$tmp"
	install_file "$tmp" "$dest" "$mode" "$what"
	rm -f "$tmp"
}

# Install the output of a command as DEST. Not a pipeline, so CHANGED reaches the caller.
install_output() {
	local dest=$1 mode=$2 what=$3 tmp
	shift 3
	tmp=$(mktemp "${TMPDIR:-/tmp}/hall-install.XXXXXX")
	"$@" >"$tmp"
	install_file "$tmp" "$dest" "$mode" "$what"
	rm -f "$tmp"
}

make_dir() {
	local dir=$1 mode=$2 what=$3
	if [ -d "$dir" ]; then
		say unchanged "$what $dir"
	else
		mkdir -p "$dir"
		chmod "$mode" "$dir"
		say created "$what $dir"
	fi
}

# Refuse to delete anything that does not look like one of our own directories.
safe_rm_dir() {
	local dir=$1 what=$2
	case $dir in
	/*/hall | /*/hall/state) ;;
	*) die "refusing to delete '$dir': not a hall directory" ;;
	esac
	[ "$dir" != "$HOME" ] || die "refusing to delete $HOME"
	if [ -e "$dir" ] || [ -L "$dir" ]; then
		rm -rf -- "$dir"
		say removed "$what $dir"
	else
		say unchanged "$what $dir (already gone)"
	fi
}

# ---------------------------------------------------------------------------------------------
# Uninstall

uninstall() {
	local key value m_bin='' m_unit='' m_service='' m_config='' m_state='' m_dyn_state='' m_logs=''
	local m_extras=()
	echo "Uninstalling Hall (manifest $MANIFEST)"
	if [ ! -f "$MANIFEST" ]; then
		say unchanged "nothing to remove: no manifest at $MANIFEST"
		if [ "$PURGE" = 1 ]; then
			die "--purge: without a manifest install.sh does not know what to delete; remove $CONFIG_DIR and $STATE_DIR yourself if they are Hall's"
		fi
		return 0
	fi
	while IFS="$TAB" read -r key value; do
		case $key in
		bin) m_bin=$value ;;
		extra) m_extras+=("$value") ;;
		unit) m_unit=$value ;;
		service) m_service=$value ;;
		config_dir) m_config=$value ;;
		state_dir) m_state=$value ;;
		dynamic_state_dir) m_dyn_state=$value ;;
		log_dir) m_logs=$value ;;
		esac
	done <"$MANIFEST"

	case $m_service in
	systemd-user | systemd-system)
		if [ "$m_service" = systemd-system ]; then SCOPE=system; else SCOPE=user; fi
		if systemctl_scoped disable --now hall.service >/dev/null 2>&1; then
			say stopped "service hall.service (disabled)"
		else
			say skipped "systemctl disable --now hall.service failed (not loaded?)"
		fi
		;;
	launchd)
		if launchctl bootout "gui/$(id -u)/$LABEL" >/dev/null 2>&1; then
			say stopped "LaunchAgent $LABEL"
		else
			say skipped "launchctl bootout gui/$(id -u)/$LABEL failed (not loaded?)"
		fi
		;;
	esac
	if [ -n "$m_unit" ]; then
		if [ -e "$m_unit" ]; then
			rm -f -- "$m_unit"
			say removed "service file $m_unit"
		else
			say unchanged "service file $m_unit (already gone)"
		fi
		case $m_service in
		systemd-*) systemctl_scoped daemon-reload >/dev/null 2>&1 || true ;;
		esac
	fi
	if [ -n "$m_bin" ]; then
		if [ -e "$m_bin" ]; then
			rm -f -- "$m_bin"
			say removed "binary $m_bin"
		else
			say unchanged "binary $m_bin (already gone)"
		fi
	fi
	for f in ${m_extras[@]+"${m_extras[@]}"}; do
		case $f in
		*/man1/hall.1 | */completions/hall | */_hall | */hall.fish) ;;
		*) die "refusing to delete '$f': not a file install.sh writes" ;;
		esac
		if [ -e "$f" ]; then
			rm -f -- "$f"
			say removed "$f"
		fi
	done
	if [ -z "$m_bin$m_unit" ]; then
		say unchanged "binary and service already removed"
	fi

	if [ "$PURGE" = 1 ]; then
		[ -z "$m_state" ] || safe_rm_dir "$m_state" "state"
		[ -z "$m_dyn_state" ] || safe_rm_dir "$m_dyn_state" "state"
		[ -z "$m_logs" ] || safe_rm_dir "$m_logs" "logs"
		[ -z "$m_config" ] || safe_rm_dir "$m_config" "config"
		return 0
	fi
	# Keep a manifest of what is left so a later --purge can still find it.
	{
		[ -z "$m_config" ] || printf 'config_dir\t%s\n' "$m_config"
		[ -z "$m_state" ] || printf 'state_dir\t%s\n' "$m_state"
		[ -z "$m_dyn_state" ] || printf 'dynamic_state_dir\t%s\n' "$m_dyn_state"
		[ -z "$m_logs" ] || printf 'log_dir\t%s\n' "$m_logs"
	} | install_text "$MANIFEST" "$CONF_FILE_MODE" "manifest"
	say kept "config $m_config (hall.toml, registry/, policies/)"
	[ -z "$m_state" ] || say kept "state $m_state (audit log, tokens, secrets)"
	echo "Config and state were kept; run with --uninstall --purge to delete them too."
}

if [ "$UNINSTALL" = 1 ]; then
	if [ "$SCOPE" = system ] && [ "$PREFIX_GIVEN" = 0 ] && [ "$(id -u)" != 0 ]; then
		die "--system needs root: sudo ./install.sh --system --uninstall"
	fi
	uninstall
	exit 0
fi

# ---------------------------------------------------------------------------------------------
# Install

if [ "$SCOPE" = system ] && [ "$PREFIX_GIVEN" = 0 ] && [ "$(id -u)" != 0 ]; then
	die "--system needs root: sudo ./install.sh --system"
fi
# Fail before building if the unit could not be written.
if [ "$SERVICE" = systemd ]; then render_systemd_unit >/dev/null; fi

echo "Installing Hall ($SCOPE, service: $SERVICE)"

if [ "${HALL_INSTALL_SKIP_BUILD:-0}" = 1 ]; then
	[ -n "${HALL_BINARY:-}" ] || die "HALL_INSTALL_SKIP_BUILD=1 needs HALL_BINARY=/path/to/hall"
	if [ ! -f "$HALL_BINARY" ] || [ ! -x "$HALL_BINARY" ]; then
		die "HALL_BINARY=$HALL_BINARY is not an executable file"
	fi
	BUILT=$HALL_BINARY
	say skipped "build (HALL_INSTALL_SKIP_BUILD=1; using $HALL_BINARY)"
else
	command -v cargo >/dev/null 2>&1 ||
		die "cargo not found: install Rust from https://rustup.rs, or set HALL_INSTALL_SKIP_BUILD=1 HALL_BINARY=/path/to/hall"
	[ -f "$SRC_DIR/Cargo.toml" ] || die "no Cargo.toml in $SRC_DIR"
	echo "  building   cargo build --release --locked (this takes a few minutes the first time)"
	# The build tree may be shared (CARGO_TARGET_DIR): build with the usual umask, not ours.
	(cd "$SRC_DIR" && umask 022 && cargo build --release --locked --bin hall)
	# cargo resolves a relative CARGO_TARGET_DIR against the directory it runs in.
	TARGET_DIR=${CARGO_TARGET_DIR:-target}
	case $TARGET_DIR in
	/*) ;;
	*) TARGET_DIR=$SRC_DIR/$TARGET_DIR ;;
	esac
	BUILT=$TARGET_DIR/release/hall
	[ -x "$BUILT" ] || die "cargo finished but $BUILT is missing"
	say built "$BUILT"
fi

install_file "$BUILT" "$BIN" 0755 "binary"
BIN_CHANGED=$CHANGED

# The man page and shell completions, generated by the installed binary from its own flags.
EXTRAS=()
install_generated() {
	local dest=$1 what=$2
	shift 2
	if "$BIN" "$@" >/dev/null 2>&1; then
		install_output "$dest" 0644 "$what" "$BIN" "$@"
		EXTRAS+=("$dest")
	else
		say skipped "$what: '$BIN $*' failed"
	fi
}
install_generated "$PREFIX/share/man/man1/hall.1" "man page" man
install_generated "$PREFIX/share/bash-completion/completions/hall" "bash completion" completions bash
install_generated "$PREFIX/share/zsh/site-functions/_hall" "zsh completion" completions zsh
install_generated "$PREFIX/share/fish/vendor_completions.d/hall.fish" "fish completion" completions fish

make_dir "$CONFIG_DIR" "$CONF_DIR_MODE" "config dir"
for name in registry policies; do
	if [ -e "$CONFIG_DIR/$name" ]; then
		say kept "$CONFIG_DIR/$name (exists: install.sh never touches your policy files)"
	elif [ -d "$SRC_DIR/$name" ]; then
		rm -rf -- "$CONFIG_DIR/$name.tmp.$$"
		cp -R "$SRC_DIR/$name" "$CONFIG_DIR/$name.tmp.$$"
		mv "$CONFIG_DIR/$name.tmp.$$" "$CONFIG_DIR/$name"
		say installed "examples $CONFIG_DIR/$name"
	else
		say skipped "examples $name/: not in $SRC_DIR"
	fi
done

case $SERVICE in
systemd) if [ "$SCOPE" = user ]; then RESTART_HINT='systemctl --user restart hall'; else RESTART_HINT='systemctl restart hall'; fi ;;
launchd) RESTART_HINT="launchctl kickstart -k gui/$(id -u)/$LABEL" ;;
*) RESTART_HINT='stop and start hall serve' ;;
esac
if [ -e "$CONFIG_FILE" ]; then
	say kept "$CONFIG_FILE (exists: edit it freely)"
else
	cat <<EOF | install_text "$CONFIG_FILE" "$CONF_FILE_MODE" "config"
# Hall configuration, written by install.sh on first install. install.sh never changes this
# file again: edit it freely, then restart the daemon ($RESTART_HINT).
# A reload (SIGHUP, \`hall reload\`) re-reads the registry and policy files only, not this file.
# HALL_* environment variables and command-line flags override these keys. The hall CLI
# reads this file too (listen: where the daemon is; state_dir: where its admin token is).
listen = "127.0.0.1:8765"
registry_dir = "$(toml_escape "$CONFIG_DIR/registry")"
policies_dir = "$(toml_escape "$CONFIG_DIR/policies")"
state_dir = "$(toml_escape "$STATE_DIR")"
# allowed_origins = []            # browser origins allowed to call the API; none by default

# [audit]
# durability = "durable"          # or "batched": faster, with a documented loss window

# [secrets]
# release_ttl = 300               # seconds after a decision during which its secrets may be released
EOF
fi

if [ "$SYSTEMD_OWNS_STATE" = 1 ]; then
	say skipped "state dir $STATE_DIR (systemd creates it: StateDirectory=hall)"
else
	make_dir "$STATE_DIR" 0700 "state dir"
fi

UNIT_FILE=
case $SERVICE in
systemd)
	UNIT_FILE=$UNIT
	install_output "$UNIT" 0644 "unit" render_systemd_unit
	UNIT_CHANGED=$CHANGED
	if ! systemctl_scoped show-environment >/dev/null 2>&1; then
		say skipped "enable: no systemd $SCOPE manager reachable (log in normally, or 'loginctl enable-linger'); then: systemctl $([ "$SCOPE" = user ] && echo '--user ')enable --now hall"
	else
		if [ "$UNIT_CHANGED" = 1 ]; then
			systemctl_scoped daemon-reload
			say reloaded "systemd units"
		fi
		if ! systemctl_scoped is-enabled --quiet hall.service 2>/dev/null; then
			systemctl_scoped enable --now hall.service
			say enabled "hall.service (started)"
		elif [ "$UNIT_CHANGED" = 1 ] || [ "$BIN_CHANGED" = 1 ]; then
			systemctl_scoped restart hall.service
			say restarted "hall.service (new binary or unit)"
		elif ! systemctl_scoped is-active --quiet hall.service 2>/dev/null; then
			systemctl_scoped start hall.service
			say started "hall.service"
		else
			say unchanged "hall.service (enabled and running)"
		fi
	fi
	;;
launchd)
	UNIT_FILE=$PLIST
	make_dir "$LOG_DIR" 0700 "log dir"
	install_output "$PLIST" 0644 "LaunchAgent" render_plist
	DOMAIN=gui/$(id -u)
	if [ "$CHANGED" = 1 ] || ! launchctl print "$DOMAIN/$LABEL" >/dev/null 2>&1; then
		launchctl bootout "$DOMAIN/$LABEL" >/dev/null 2>&1 || true
		launchctl bootstrap "$DOMAIN" "$PLIST"
		say loaded "LaunchAgent $LABEL"
	elif [ "$BIN_CHANGED" = 1 ]; then
		launchctl kickstart -k "$DOMAIN/$LABEL"
		say restarted "LaunchAgent $LABEL (new binary)"
	else
		say unchanged "LaunchAgent $LABEL (loaded)"
	fi
	;;
*)
	if [ "$NO_SERVICE" = 1 ]; then
		say skipped "service (--no-service)"
	else
		say skipped "service: neither systemd (systemctl and /run/systemd/system) nor launchd found"
	fi
	;;
esac

{
	printf 'bin\t%s\n' "$BIN"
	for f in ${EXTRAS[@]+"${EXTRAS[@]}"}; do printf 'extra\t%s\n' "$f"; done
	if [ -n "$UNIT_FILE" ]; then
		printf 'unit\t%s\n' "$UNIT_FILE"
		case $SERVICE in
		systemd) printf 'service\tsystemd-%s\n' "$SCOPE" ;;
		launchd) printf 'service\tlaunchd\n' ;;
		esac
	fi
	printf 'config_dir\t%s\n' "$CONFIG_DIR"
	printf 'state_dir\t%s\n' "$STATE_DIR"
	# DynamicUser=yes keeps the real directory there; /var/lib/hall is a symlink to it.
	if [ "$SYSTEMD_OWNS_STATE" = 1 ]; then printf 'dynamic_state_dir\t%s\n' /var/lib/private/hall; fi
	if [ "$SERVICE" = launchd ]; then printf 'log_dir\t%s\n' "$LOG_DIR"; fi
} | install_text "$MANIFEST" "$CONF_FILE_MODE" "manifest"

# ---------------------------------------------------------------------------------------------
# Summary

SUDO=
[ "$SCOPE" = system ] && SUDO="sudo "
echo
echo "Hall is installed."
echo "  binary   $BIN"
echo "  config   $CONFIG_FILE (registry/ and policies/ next to it)"
echo "  state    $STATE_DIR"
# The address the daemon really uses: the listen key of the config in force (a kept,
# edited hall.toml included), localhost and 0.0.0.0 shown as the loopback address a client uses.
LISTEN=$(sed -n 's/^[[:space:]]*listen[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$CONFIG_FILE" | head -n 1)
[ -n "$LISTEN" ] || LISTEN=127.0.0.1:8765
case $LISTEN in
localhost:* | 0.0.0.0:*) LISTEN=127.0.0.1:${LISTEN##*:} ;;
"[::]:"*) LISTEN="[::1]:${LISTEN##*:}" ;;
esac
echo "  daemon   http://$LISTEN (the listen key in hall.toml)"
echo "  token    $STATE_DIR/admin.token, written by the daemon at first start (0600)"
if [ "$PREFIX_GIVEN" = 1 ]; then
	# Only the per-user and system locations are found without being named.
	echo "  try      ${SUDO}HALL_CONFIG='$CONFIG_FILE' '$BIN' status"
else
	echo "  try      ${SUDO}'$BIN' status    (the CLI finds $CONFIG_FILE by itself)"
fi
case $SERVICE in
systemd)
	if [ "$SCOPE" = system ]; then
		echo "  service  systemctl status hall | journalctl -u hall | systemctl reload hall"
	else
		echo "  service  systemctl --user status hall | journalctl --user -u hall | systemctl --user reload hall"
		echo "           (keep it running while logged out: loginctl enable-linger $(id -un))"
	fi
	;;
launchd)
	echo "  service  launchctl print gui/$(id -u)/$LABEL | logs in $LOG_DIR"
	echo "           reload: launchctl kill SIGHUP gui/$(id -u)/$LABEL"
	;;
*)
	echo "  run      '$BIN' serve --config '$CONFIG_FILE'"
	;;
esac
case :$PATH: in
*:"$PREFIX/bin":*) ;;
*) echo "  note     $PREFIX/bin is not on your PATH" ;;
esac
echo "  remove   $0 $([ "$SCOPE" = system ] && echo '--system ')$([ "$PREFIX_GIVEN" = 1 ] && echo "--prefix '$PREFIX' ")--uninstall [--purge]"
