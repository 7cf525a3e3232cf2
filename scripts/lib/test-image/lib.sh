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
