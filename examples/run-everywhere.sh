#!/bin/sh
# run-everywhere.sh: run one shell command on every node of a ninefs mount, all at once.
#
#   run-everywhere.sh MOUNTPOINT CMD...     (or: NINEFS_MNT=MOUNTPOINT run-everywhere.sh CMD...)
#   run-everywhere.sh ~/cluster 'uname -r; df -h . | tail -1'
#
# Each node runs `sh -c CMD` (CMD's words joined into one shell command, as ssh does; stdin
# closed) as a job made by its own /n/NODE/jobs/clone. The output comes back with the node's
# name in front (stderr stays on stderr), then one `NODE exit N` line per node. Exits 1 if
# any node failed or was down.
set -u
if [ -n "${NINEFS_MNT:-}" ]; then mnt=$NINEFS_MNT; else mnt=${1:?usage: run-everywhere.sh MOUNTPOINT CMD...}; shift; fi
[ $# -gt 0 ] || { echo "usage: run-everywhere.sh MOUNTPOINT CMD..." >&2; exit 2; }

# Start it everywhere first, so that the nodes run it in parallel: NODE:ID for each.
started=
for d in "$mnt"/n/*; do
	node=${d##*/}
	jobs=$d/jobs
	if id=$(cat "$jobs/clone") && printf 'run %s\nclose-stdin\n' "$*" > "$jobs/$id/ctl"; then
		started="$started $node:$id"
	else
		started="$started $node:down"
	fi
done

# Then collect, node by node. stdout and stderr stream until the job ends; wait then says how.
summary='' failed=0
for nj in $started; do
	node=${nj%%:*}
	id=${nj#*:}
	job=$mnt/n/$node/jobs/$id
	if [ "$id" = down ]; then
		how=down
	else
		sed "s/^/$node: /" "$job/stdout"
		sed "s/^/$node: /" "$job/stderr" >&2
		how=$(cat "$job/wait")
		echo rm > "$job/ctl"
	fi
	[ "$how" = "exit 0" ] || failed=1
	summary="$summary$node $how
"
done
printf %s "$summary"
exit $failed
