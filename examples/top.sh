#!/bin/sh
# top.sh: every node's load, cpus, free memory and running jobs, once a second, like top.
#
#   top.sh [-n N] [-d SECS] MOUNTPOINT      (or: NINEFS_MNT=MOUNTPOINT top.sh [-n N])
#
# -n N stops after N screens (default: until Ctrl-C); -d SECS sets the interval (default 1).
# Each screen is a header line and one line per node, read from the node's own files:
# /n/NODE/cpu/load, cpu/ncpu, mem/available and the running jobs in /n/NODE/metrics. A node
# that does not answer shows `down`.
set -u
count=0 delay=1
while getopts n:d: opt; do
	case $opt in
	n) count=$OPTARG ;;
	d) delay=$OPTARG ;;
	*) echo "usage: top.sh [-n N] [-d SECS] MOUNTPOINT" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
mnt=${NINEFS_MNT:-${1:?usage: top.sh [-n N] [-d SECS] MOUNTPOINT}}

i=0
while :; do
	[ -t 1 ] && printf '\033[H\033[2J'  # clear the screen, on a terminal only
	printf '%-10s %6s %5s %9s %5s   %s\n' NODE LOAD CPUS FREE JOBS "$(date +%T)"
	for d in "$mnt"/n/*; do
		node=${d##*/}
		if read -r load _ < "$d/cpu/load" && read -r cpus < "$d/cpu/ncpu" &&
			read -r avail < "$d/mem/available" && metrics=$(cat "$d/metrics"); then
			running=$(echo "$metrics" | awk '$1 == "ninefs_jobs{state=\"running\"}" { print $2 }')
			free=$(awk -v b="$avail" 'BEGIN { printf "%.1fG", b / 2^30 }')
			printf '%-10s %6s %5s %9s %5s\n' "$node" "$load" "$cpus" "$free" "${running:-0}"
		else
			printf '%-10s %6s\n' "$node" down
		fi 2>/dev/null
	done
	i=$((i + 1))
	[ "$count" -gt 0 ] && [ "$i" -ge "$count" ] && break
	sleep "$delay"
done
