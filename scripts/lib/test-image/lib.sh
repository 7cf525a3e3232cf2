# shellcheck shell=dash
# Shared helpers of the tuchka test image's guest scripts (sourced by rcS, rcK, the udhcpc hook
# and the ACPI power-button handler). Runs under busybox ash.
#
# Marker protocol: every line the harness parses starts with "TESTIMG-" and goes to /dev/console
# (ttyS0). Markers printed after TESTIMG-READY (or from a background process) get a leading
# newline, because the console may hold a half-written line such as busybox init's askfirst banner.

PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH

# State of the running boot (tmpfs).
TESTIMG_RUN=/run/testimg

# marker WORDS... -- print "TESTIMG-WORDS..." on its own line on the console.
marker() {
	printf 'TESTIMG-%s\n' "$*" >/dev/console
}

# async_marker WORDS... -- like marker, but starts with a newline once boot has finished.
async_marker() {
	if [ -e "$TESTIMG_RUN/ready" ]; then
		printf '\nTESTIMG-%s\n' "$*" >/dev/console
	else
		marker "$@"
	fi
}

# disk_serial DEV -- the serial of block device DEV (/sys/block/DEV/serial, else
# DEV/device/serial) as /dev/disk/by-id/virtio-<serial> spells it: like udev, outer whitespace
# trimmed, inner runs of whitespace and characters other than A-Za-z0-9#+-.:=@_ become "_".
# Prints nothing when the disk has no serial.
disk_serial() {
	for file in "/sys/class/block/$1/serial" "/sys/class/block/$1/device/serial"; do
		[ -r "$file" ] || continue
		sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e 's/[[:space:]]\{1,\}/_/g' \
			-e 's/[^A-Za-z0-9#+.:=@_-]/_/g' "$file" 2>/dev/null
		return 0
	done
}

# disk_mib DEV -- the size of block device DEV in MiB (rounded down), read from sysfs now, so a
# live resize shows.
disk_mib() {
	echo $(($(cat "/sys/class/block/$1/size") / 2048))
}

# disk_mounted DISK -- "mounted" when DISK or one of its partitions is in /proc/mounts, else
# "unmounted".
disk_mounted() {
	if awk -v d="/dev/$1" '$1 == d || index($1, d) == 1 && substr($1, length(d) + 1) ~ /^p?[0-9]+$/ { found = 1 }
		END { exit !found }' /proc/mounts 2>/dev/null; then
		echo mounted
	else
		echo unmounted
	fi
}

# disks -- the names of the disks (vd*, sd*; not partitions, CD drives or loop devices),
# sorted. No glob: the CGI programs run with "set -f".
disks() {
	find /sys/block/ -mindepth 1 -maxdepth 1 \( -name 'vd*' -o -name 'sd*' \) 2>/dev/null |
		sed 's|.*/||' | sort
}

# disk_line DISK -- "<name> <MiB> <serial or -> <mounted|unmounted>", as /cgi-bin/disks and the
# TESTIMG-DISK marker print it.
disk_line() {
	serial=$(disk_serial "$1")
	echo "$1 $(disk_mib "$1") ${serial:--} $(disk_mounted "$1")"
}
