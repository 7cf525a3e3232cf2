# shellcheck shell=bash
# Shared helpers of tuchka's host-side scripts (build-test-image, install-deps, start-libvirt).
# Source it; it defines functions only and adds the sbin directories to PATH.

PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# tk_log MESSAGE... -- print "<script>: MESSAGE" on stderr.
tk_log() {
	printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# tk_die MESSAGE... -- print "<script>: error: MESSAGE" on stderr and exit 1.
tk_die() {
	tk_log "error: $*"
	exit 1
}

# tk_need_tool TOOL PACKAGE -- fail with a hint naming the Debian package when TOOL is missing.
tk_need_tool() {
	command -v "$1" >/dev/null 2>&1 ||
		tk_die "'$1' not found: install the Debian package '$2' (./scripts/install-deps installs everything tuchka needs)"
}

# tk_need_file PATH PACKAGE -- like tk_need_tool, for a data file a package ships.
tk_need_file() {
	[ -e "$1" ] ||
		tk_die "'$1' not found: install the Debian package '$2' (./scripts/install-deps installs everything tuchka needs)"
}
