#!/bin/sh
# submit.sh: place one job on the cluster, stream its output, exit with its exit status.
#
#   submit.sh MOUNTPOINT [options] CMD [ARG...]     (or: NINEFS_MNT=MOUNTPOINT submit.sh ...)
#     -n NODE   run it on NODE            -l LABEL  on a node with LABEL (`serve --label`)
#     -e K=V    set K in its environment (repeatable)
#     -d DIR    run it in DIR, a directory on the node (default: the node's storage)
#     -t SECS   kill it after SECS seconds  -m SIZE  limit its memory (512M, 2G)
#     -r        restart it elsewhere if its node goes down
#   submit.sh ~/cluster -l big -e MODE=fast -t 3600 -- make -j8 test
#
# The job is made by the cluster's /jobs/clone (the least loaded node that fits) and runs
# CMD with ARGs as they are, no shell (`exec`), stdin closed. Its id and how it ended go to
# stderr (`n2.17: exit 0`); its stdout and stderr stream to ours as it runs.
set -u
if [ -n "${NINEFS_MNT:-}" ]; then mnt=$NINEFS_MNT; else mnt=${1:?usage: submit.sh MOUNTPOINT [options] CMD...}; shift; fi

q() { printf "'%s'" "$(printf %s "$1" | sed "s/'/'\\\\''/g")"; }  # quote a word for sh

ctl=''  # what to tell the job's ctl before it starts, one command a line
while getopts n:l:e:d:t:m:r opt; do
	case $opt in
	n) ctl="${ctl}node $OPTARG
" ;;
	l) ctl="${ctl}label $OPTARG
" ;;
	e) ctl="${ctl}env $(q "$OPTARG")
" ;;
	d) ctl="${ctl}dir $(q "$OPTARG")
" ;;
	t) ctl="${ctl}limit time $OPTARG
" ;;
	m) ctl="${ctl}limit mem $OPTARG
" ;;
	r) ctl="${ctl}restart on-failure
" ;;
	*) exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: submit.sh MOUNTPOINT [options] CMD [ARG...]" >&2; exit 2; }
argv=
for a in "$@"; do argv="$argv $(q "$a")"; done

id=$(cat "$mnt/jobs/clone") || exit 1
job=$mnt/jobs/$id
if ! printf '%sexec%s\nclose-stdin\n' "$ctl" "$argv" > "$job/ctl"; then
	why=$(sed -n 's/^error //p' "$job/status")  # `-`: no node that is up fits
	echo "submit.sh: $id did not start: ${why#-}" >&2
	echo rm > "$job/ctl"
	exit 1
fi
echo "$id: started" >&2
cat "$job/stderr" >&2 &
cat "$job/stdout"
wait
how=$(cat "$job/wait")
echo "$id: $how" >&2
case $how in
"exit "*) exit "${how#exit }" ;;
*) exit 1 ;;
esac
