#!/usr/bin/env bash
# Starts benchmark queues in the background, as a session should: from a clone of this repository at its
# HEAD commit, installed into a venv of its own, so that code work in the repository does not change what
# trains; one queue runner per work folder; each record committed to this repository as its run ends
# (benchmarks/queue.sh). Run it again after a stop (or on a new machine of the records' processor kind) with
# the same arguments: recorded runs are skipped and a stopped one resumes with nnU-Net's --c.
#
#   benchmarks/launch.sh WORKDIR RECORDS_NAME QUEUE [QUEUE ...]
#   e.g. DATA=../shared/data/Task04_Hippocampus benchmarks/launch.sh /work/bench/scarce_fixed \
#            hippocampus_scarce_fixed_avx512 benchmarks/queues/issue28_methods_and_label_curve.sh \
#            benchmarks/queues/issue29_3d_fullres.sh
#
# Beside WORKDIR it keeps clone-COMMIT (the clone), queue-COMMIT (the copies bash reads while they run) and
# launch_RECORDS_NAME.out (this runner's own output); each run's output goes to queue_RECORDS_NAME.log.
# VENV (default: bench-venv beside WORKDIR) is made and filled on first use (nnU-Net and torch: minutes).
# Only committed code is cloned: commit first.
set -euo pipefail
[ $# -ge 3 ] || { sed -n 8,11p "$0"; exit 2; }
workdir=$(realpath -m "$1") records=$2
shift 2
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse --short=7 HEAD)
base=$(dirname "$workdir")
venv=$(realpath -m "${VENV:-$base/bench-venv}")
data=$(realpath -m "${DATA:-$repo/../shared/data/Task04_Hippocampus}")
queues=()
for queue in "$@"; do
    [ -f "$queue" ] || { echo "launch: no queue file $queue: name files of benchmarks/queues/" >&2; exit 2; }
    queues+=("$(realpath "$queue")")
done
[ -d "$data" ] || { echo "launch: no dataset at $data: set DATA to the MSD task folder" >&2; exit 2; }
if pgrep -f "queue.sh [^ ]+ $workdir " > /dev/null; then
    echo "launch: a queue already runs in $workdir (pgrep -af queue.sh): stop it first or let it finish" >&2
    exit 2
fi

mkdir -p "$base"
clone=$base/clone-$commit
[ -d "$clone" ] || git clone -q "$repo" "$clone"
git -C "$clone" -c advice.detachedHead=false checkout -q "$commit"
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q "$clone"; }
installed() { (cd / && "$venv/bin/python" -c \
    "from nnunet_contrast.commands.benchmark.records import source_commit; print(source_commit())"); }
[ "$(installed)" = "$commit" ] || "$venv/bin/pip" install -q --no-deps --force-reinstall "$clone"
[ "$(installed)" = "$commit" ] || { echo "launch: $venv holds $(installed), not $commit" >&2; exit 1; }

# a records name belongs to one processor kind: refuse here rather than in every run of the queue
(cd / && "$venv/bin/python" - "$repo/docs/benchmark/$records/results" <<'EOF') || exit 2
import json, sys
from pathlib import Path

import torch

from nnunet_contrast.commands.benchmark.records import cpu_description, kind

here = cpu_description(torch)
for path in sorted(Path(sys.argv[1]).rglob("*.json"))[:1]:
    theirs = kind(json.loads(path.read_text()))
    if theirs != here:
        sys.exit(f"launch: {sys.argv[1]} holds runs of another processor kind ({theirs}; this machine: {here}): "
                 "name new records, e.g. with the kind in the name, and a new work folder")
EOF

copies=$base/queue-$commit
mkdir -p "$copies"
cp "$repo/benchmarks/queue.sh" "$copies/"
copied=()
for queue in "${queues[@]}"; do cp "$queue" "$copies/" && copied+=("$copies/$(basename "$queue")"); done
cd "$clone"
DATA=$data nohup setsid bash "$copies/queue.sh" "$venv" "$workdir" "$repo" "$records" "${copied[@]}" \
    > "$base/launch_$records.out" 2>&1 < /dev/null &
echo "launch: queue started at $commit (pid $!); runs log to $base/queue_$records.log"
