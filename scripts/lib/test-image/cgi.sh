# shellcheck shell=dash
# Shared helpers of the tuchka test image's CGI programs (/srv/www/cgi-bin/, run by busybox
# httpd) and of the fill worker. Runs under busybox ash.
#
# Reply protocol: text/plain, one fact per line. Success is "200 OK" with the endpoint's body; a
# failure is a 4xx or 5xx status with the one-line body "error <message>". See
# docs/test-image.md.
#
# The data pattern: SEED's block is 65521 bytes (a prime, so it does not line up with 512- or
# 4096-byte sectors): x0 = (the first 8 hex digits of sha256(SEED) as a number) mod 2147483646
# + 1, x(k+1) = 16807 * x(k) mod 2147483647 (Park-Miller), and each x(k), k >= 1, gives the
# three bytes of floor(x(k) / 128), big-endian; the first 65521 of those bytes are the block.
# The stream is the block repeated; "N MiB of SEED" are its first N * 1048576 bytes.

# shellcheck source-path=SCRIPTDIR source=lib.sh
. /etc/testimg/lib.sh

# QUERY_STRING is split on "&": no pathname expansion of its pieces.
set -f

PATTERN_BYTES=65521
MIB=1048576
MAX_MIB=1048576 # 1 TiB: larger numbers are refused
# shellcheck disable=SC2034 # for the CGI programs
TESTDATA=/var/lib/testdata

# reply_ok LINE... -- print the headers and each LINE on a line of its own; exit.
reply_ok() {
	printf 'Content-Type: text/plain\r\n\r\n'
	printf '%s\n' "$@"
	exit 0
}

# reply_error STATUS MESSAGE... -- reply "STATUS" (e.g. "404 Not Found") and "error MESSAGE"; exit.
reply_error() {
	status=$1
	shift
	printf 'Status: %s\r\nContent-Type: text/plain\r\n\r\nerror %s\n' "$status" "$*"
	exit 0
}

# query KEY -- print the URL-decoded value of KEY in QUERY_STRING (the first one); false when
# KEY is absent. The value is printed as it is, without a newline.
query() {
	old_ifs=$IFS
	IFS='&'
	for pair in ${QUERY_STRING:-}; do
		case "$pair" in
		"$1="*)
			IFS=$old_ifs
			[ -z "${pair#*=}" ] || httpd -d "${pair#*=}"
			return 0
			;;
		"$1")
			IFS=$old_ifs
			return 0
			;;
		esac
	done
	IFS=$old_ifs
	return 1
}

# need_mib NAME VALUE -- VALUE must be a whole number of MiB in 1..MAX_MIB (400 otherwise).
need_mib() {
	case "$2" in
	'' | *[!0-9]* | 0*) reply_error "400 Bad Request" "$1 must be a whole number of MiB > 0, not '$2'" ;;
	esac
	if [ "${#2}" -gt 7 ] || [ "$2" -gt "$MAX_MIB" ]; then
		reply_error "400 Bad Request" "$1=$2 is more than $MAX_MIB MiB"
	fi
}

# need_name NAME VALUE -- VALUE must be 1-64 characters of A-Za-z0-9._:+=@#- (400 otherwise).
need_name() {
	case "$2" in
	'' | *[!A-Za-z0-9._:+=@#-]*) reply_error "400 Bad Request" "$1 must be 1-64 characters of A-Za-z0-9._:+=@#-, not '$2'" ;;
	esac
	[ "${#2}" -le 64 ] || reply_error "400 Bad Request" "$1 is longer than 64 characters"
}

# disk_by_id ID -- set dev to the device /dev/disk/by-id/virtio-ID points to and disk to its
# name (404 when there is none). Not in $(...): it replies and exits on failure.
disk_by_id() {
	need_name id "$1"
	dev=$(readlink -f "/dev/disk/by-id/virtio-$1" 2>/dev/null) || dev=""
	[ -b "$dev" ] || reply_error "404 Not Found" "no disk /dev/disk/by-id/virtio-$1 (see /cgi-bin/disks)"
	disk=${dev##*/}
}

# need_unmounted -- refuse (409) to write to $disk while it or a partition of it is mounted.
need_unmounted() {
	[ "$(disk_mounted "$disk")" = unmounted ] ||
		reply_error "409 Conflict" "$dev is mounted (this is the root disk?): not writing to it"
}

# pattern_file SEED -- print the path of a file holding 16 copies of SEED's block (1048336
# bytes: the stream is that file repeated), made on first use in /run/testimg/pattern/.
pattern_file() {
	dir="$TESTIMG_RUN/pattern"
	file="$dir/$1"
	if [ ! -s "$file" ]; then
		mkdir -p "$dir"
		x=$(printf '%s' "$1" | sha256sum | cut -c 1-8)
		x=$((0x$x % 2147483646 + 1))
		awk -v x="$x" -v n=$(((PATTERN_BYTES + 2) / 3)) 'BEGIN {
			for (i = 0; i < n; i++) {
				x = (x * 16807) % 2147483647
				printf "%06x", int(x / 128)
			}
		}' | xxd -r -p | head -c "$PATTERN_BYTES" >"$file.block.$$"
		[ "$(wc -c <"$file.block.$$")" -eq "$PATTERN_BYTES" ] || {
			rm -f "$file.block.$$"
			return 1
		}
		for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do
			cat "$file.block.$$"
		done >"$file.$$"
		rm -f "$file.block.$$"
		mv -f "$file.$$" "$file"
	fi
	echo "$file"
}

# need_pattern SEED -- make SEED's pattern file now (500 when that fails), so that a later
# pattern_stream cannot fail half-way.
need_pattern() {
	need_name seed "$1"
	pattern_file "$1" >/dev/null || reply_error "500 Internal Server Error" "could not make the data pattern of seed $1"
}

# pattern_stream SEED MIB -- write the first MIB MiB of SEED's stream to stdout.
pattern_stream() {
	file=$(pattern_file "$1") || return 1
	{ while cat "$file"; do :; done; } 2>/dev/null | head -c $(($2 * MIB))
}

# temp_dir -- set work to a new directory under /run/testimg, removed when the script exits.
temp_dir() {
	work=$(mktemp -d "$TESTIMG_RUN/cgi.XXXXXX") ||
		reply_error "500 Internal Server Error" "cannot create a directory in $TESTIMG_RUN"
	# shellcheck disable=SC2064 # expand $work now
	trap "rm -rf '$work'" EXIT
}

# first_error FILE -- the first line of FILE without the "dd: " program prefix.
first_error() {
	sed -n '1{s/^[a-z0-9]*: //;p}' "$1" 2>/dev/null
}

# The fill's files, on the root file system so they outlast a reboot. The progress (MiB
# written) and the state are rewritten in place at a fixed size, which works on a full file
# system too.
# shellcheck disable=SC2034 # for the fill programs
FILL_PROGRESS="$TESTDATA/fill.progress"
FILL_STATE="$TESTDATA/fill.state"

# set_fill_state WORDS... -- replace the fill's state: "running", "done", "full", "stopped" or
# "error <message>".
set_fill_state() {
	printf '%-255.255s\n' "$*" 1<>"$FILL_STATE"
}

# drop_caches -- write back and forget the page cache, so that reads come from the disk.
drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || :
}

# compare_pattern FILE SEED AT MIB -- compare MIB MiB of FILE from MiB AT with the first MIB
# MiB of SEED's stream; needs temp_dir. Prints "ok" or "mismatch" and "differs_at <byte>" (the
# offset from MiB AT of the first byte that differs); false with the reason in $work/why when
# FILE cannot be read that far.
compare_pattern() {
	mkfifo "$work/data"
	dd if="$1" bs=1M skip="$3" count="$4" iflag=fullblock 2>"$work/err" >"$work/data" &
	dd_pid=$!
	pattern_stream "$2" "$4" | cmp - "$work/data" >"$work/cmp" 2>&1
	cmp_rc=$?
	# cmp stops at the first difference: the reader is not needed any more.
	kill "$dd_pid" 2>/dev/null
	wait "$dd_pid"
	dd_rc=$?
	case "$cmp_rc" in
	0)
		echo ok
		return 0
		;;
	1)
		# "- /run/…/data differ: char N, line L" (N counts from 1) or "cmp: EOF on …".
		at=$(sed -n 's/.* differ: char \([0-9]*\),.*/\1/p' "$work/cmp")
		if [ -n "$at" ]; then
			echo mismatch
			echo "differs_at $((at - 1))"
			return 0
		fi
		;;
	esac
	if [ "$dd_rc" != 0 ] && [ -s "$work/err" ]; then
		first_error "$work/err" >"$work/why"
	else
		first_error "$work/cmp" >"$work/why"
	fi
	return 1
}
