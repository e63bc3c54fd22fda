#!/usr/bin/env bash
# Runs a benchmark queue: one benchmark run at a time, each record committed to the repository as soon as
# its run ends. Runs from a clone at a fixed commit, installed into its own venv (pip install CLONE), so
# that code work in the repository does not change what trains. Resumable: finished runs are skipped, a
# stopped one continues with nnU-Net's --c. Start it again after a stop with the same arguments.
#
#   benchmarks/queue.sh VENV WORKDIR REPO RECORDS_NAME QUEUE [QUEUE ...]
#   e.g. benchmarks/queue.sh /work/bvenv /work/bench/scarce_fixed /work/main hippocampus_scarce_fixed_avx512 \
#            /work/main/benchmarks/queues/issue26_scarce_fixed_teacher.sh
#
# QUEUE is a bash file of ``run "DESCRIPTION" BENCHMARK_ARGS...`` lines (benchmarks/queues/); several run one
# after the other. Copy this script and the queues out of the repository before starting them: bash reads a
# script while it runs. benchmarks/launch.sh does all of it: clone, venv, copies, start in the background.
set -uo pipefail
venv=$1 workdir=$2 repo=$3 records=$4
shift 4
data=${DATA:-$repo/../shared/data/Task04_Hippocampus}
export nnUNet_def_n_proc=2 nnUNet_n_proc_DA=2
LO=nnUNetTrainerLabeledOnly ST=nnUNetTrainerSelfTraining CP=nnUNetTrainerCopyPaste

keep() {  # copy the records into the repository and commit them (only those paths)
    local target=docs/benchmark/$records
    # the records only, then results.csv from all of the repository's (records carried over from another
    # workdir of this processor kind may be there and not in this workdir)
    mkdir -p "$repo/$target" && cp -r "$workdir/results" "$repo/$target/" 2>/dev/null || return 0
    "$venv/bin/python" -c "from nnunet_contrast.commands.benchmark.records import write_csv; write_csv('$repo/$target')"
    for attempt in 1 2 3 4 5; do
        if git -C "$repo" add "$target"; then
            git -C "$repo" diff --cached --quiet -- "$target" && return 0  # no new record: nothing to commit
            git -C "$repo" commit -q -m "$1" -- "$target" && return 0
        fi
        sleep 5  # the index may be locked by a commit of the code work beside this queue
    done
}

run() {  # run DESCRIPTION ARGS...: one benchmark call, then its records kept
    local description=$1; shift
    nice -n 5 "$venv/bin/nnunet-contrast" benchmark --workdir "$workdir" --msd "$data" "$@" \
        >> "$workdir/../queue_$records.log" 2>&1
    keep "benchmark ($records): $description"
}

mkdir -p "$workdir" || exit 1
exec 9> "$workdir.lock"  # one runner per work folder (its runs' processes keep the lock until they end)
flock -n 9 || { echo "queue: another runner holds $workdir.lock: let it finish or stop it" >&2; exit 2; }
# a new machine of the records' processor kind: its records count as done (runs of this kind repeat to the digit;
# the benchmark refuses records of another kind)
[ -d "$workdir/results" ] || cp -r "$repo/docs/benchmark/$records/results" "$workdir/" 2>/dev/null
while pgrep -f "nnunet-contrast benchmark --workdir" > /dev/null; do sleep 30; done  # one benchmark at a time
for queue in "$@"; do source "$queue"; done
echo "queue finished $(date -Is)" >> "$workdir/../queue_$records.log"
