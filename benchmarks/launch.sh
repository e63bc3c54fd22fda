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
# Beside WORKDIR it keeps clone-COMMIT (the clone), queue-COMMIT-RECORDS_NAME (the copies bash reads while they
# run), WORKDIR.lock and launch_RECORDS_NAME.out (the runner's own output); each run's output goes to
# queue_RECORDS_NAME.log. VENV (default: bench-venv beside WORKDIR) is made and filled on first use (nnU-Net and
# torch: minutes). Only committed code and queue files run: commit first.
set -euo pipefail
[ $# -ge 3 ] || { sed -n 8,11p "$0"; exit 2; }
workdir=$(realpath -m "$1") records=$2
shift 2
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
base=$(dirname "$workdir")
venv=$(realpath -m "${VENV:-$base/bench-venv}")
data=$(realpath -m "${DATA:-$repo/../shared/data/Task04_Hippocampus}")
refuse() { echo "launch: $1" >&2; exit 2; }

queues=()  # the committed queue files, as paths inside the repository
for queue in "$@"; do
    relative=$(realpath -m --relative-to="$repo" "$queue")
    git -C "$repo" cat-file -e "HEAD:$relative" 2>/dev/null || refuse "$queue is no committed file of $repo: commit it"
    queues+=("$relative")
done
[ -d "$data" ] || refuse "no dataset at $data: set DATA to the MSD task folder"
mkdir -p "$base"
flock -n "$workdir.lock" true || refuse "a queue already runs in $workdir ($workdir.lock is held): let it finish or stop it"
git -C "$repo" diff --quiet HEAD -- . ':!docs/benchmark' || echo "launch: uncommitted changes stay out of the run"

commit=$(git -C "$repo" rev-parse --short=7 HEAD)
clone=$base/clone-$commit
[ -d "$clone" ] || { git clone -q --no-checkout "$repo" "$clone" && git -C "$clone" fetch -q "$repo" HEAD &&
                     git -C "$clone" -c advice.detachedHead=false checkout -q FETCH_HEAD; }
described=$(git -C "$clone" describe --always --dirty --abbrev=7)  # how the installed package names its commit
installed() { (cd / && "$venv/bin/python" -c \
    "from nnunet_contrast.commands.benchmark.records import source_commit; print(source_commit())" 2>/dev/null) || true; }
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "$clone"  # the package of this commit and any dependency the venv lacks
[ "$(installed)" = "$described" ] || "$venv/bin/pip" install -q --force-reinstall --no-deps "$clone"
[ "$(installed)" = "$described" ] || { echo "launch: $venv holds '$(installed)', not $described" >&2; exit 1; }

# a records name belongs to one processor kind and one torch and nnU-Net: refuse here rather than in every run
(cd / && "$venv/bin/python" - "$repo/docs/benchmark/$records/results" <<'PY') || exit 2
import json, sys
from pathlib import Path

from nnunet_contrast.commands.benchmark.records import environment

names = {"cpu": "processor kind", "torch": "torch", "nnunetv2": "nnunetv2"}  # "cpu" is what records.kind reads
here = environment()
for path in sorted(Path(sys.argv[1]).rglob("*.json"))[:1]:
    theirs = json.loads(path.read_text())["environment"]
    differ = [f"{name} {theirs.get(k)} (here {here[k]})" for k, name in names.items() if theirs.get(k) != here[k]]
    if differ:
        sys.exit(f"launch: {sys.argv[1]} holds runs of another {', '.join(differ)}: seeded runs repeat only "
                 "there; name new records and a new work folder, or install that torch and nnunetv2")
PY

copies=$base/queue-$commit-$records
rm -rf "$copies" && mkdir -p "$copies"
cp "$clone/benchmarks/queue.sh" "$copies/"
copied=()
for queue in "${queues[@]}"; do
    copied+=("$copies/$(printf '%02d' ${#copied[@]})-$(basename "$queue")")
    cp "$clone/$queue" "${copied[-1]}"
done
cd "$clone"
DATA=$data nohup setsid bash "$copies/queue.sh" "$venv" "$workdir" "$repo" "$records" "${copied[@]}" \
    > "$base/launch_$records.out" 2>&1 < /dev/null &
echo "launch: queue started at $described (pid $!); runs log to $base/queue_$records.log"
