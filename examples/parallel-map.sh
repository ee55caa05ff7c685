#!/bin/sh
# parallel-map.sh: a parallel map over the files of a directory in one node's storage.
#
#   parallel-map.sh MOUNTPOINT NODE INDIR OUTDIR CMD...
#   parallel-map.sh ~/cluster n2 logs counts wc -l     # counts/F is `wc -l < logs/F`
#   parallel-map.sh ~/cluster n2 logs packed gzip -9   # packed/F is logs/F, gzipped
#   (or set NINEFS_MNT=MOUNTPOINT and leave MOUNTPOINT out)
#
# INDIR and OUTDIR are under /n/NODE/storage. For each file F in INDIR a job made by the
# cluster's /jobs/clone and held to NODE (the data is there) runs `CMD < INDIR/F > OUTDIR/F`
# (CMD's words are joined into one shell command, as ssh does; a job starts in its node's
# storage directory). They all run at once; then each is waited
# for and reported, `F exit N`. Exits 1 if any failed.
set -u
if [ -n "${NINEFS_MNT:-}" ]; then mnt=$NINEFS_MNT; else mnt=${1:?usage: parallel-map.sh MOUNTPOINT NODE INDIR OUTDIR CMD...}; shift; fi
[ $# -ge 4 ] || { echo "usage: parallel-map.sh MOUNTPOINT NODE INDIR OUTDIR CMD..." >&2; exit 2; }
node=$1 in=$2 out=$3
shift 3
mkdir -p "$mnt/n/$node/storage/$out" || exit 1

q() { printf "'%s'" "$(printf %s "$1" | sed "s/'/'\\\\''/g")"; }  # quote a word for sh

started=''  # one `ID FILE` line per job
for f in "$mnt/n/$node/storage/$in"/*; do
	[ -f "$f" ] || continue
	name=${f##*/}
	id=$(cat "$mnt/jobs/clone") || exit 1
	printf 'node %s\nrun %s < %s > %s\nclose-stdin\n' "$node" "$*" "$(q "$in/$name")" "$(q "$out/$name")" \
		> "$mnt/jobs/$id/ctl" || exit 1
	started="$started$id $name
"
done
[ -n "$started" ] || { echo "no files in /n/$node/storage/$in" >&2; exit 1; }

n=0 failed=0
while read -r id name; do
	[ -n "$id" ] || continue
	how=$(cat "$mnt/jobs/$id/wait")
	cat "$mnt/jobs/$id/stderr" >&2
	echo rm > "$mnt/jobs/$id/ctl"
	echo "$name $how"
	n=$((n + 1))
	[ "$how" = "exit 0" ] || failed=$((failed + 1))
done <<END
$started
END
echo "$n files, $failed failed"
[ "$failed" -eq 0 ]
