#!/usr/bin/env bash
# Rows of the 2d CPU Hippocampus study, one run at a time, in one command:
#
#   TRAINERS="..." [CACHED_TRAINERS="..."] [PRESTAGE_OPTIONS="TRAINER=OPTIONS"] \
#       bash benchmarks/hippocampus_rows.sh OUTPUT [RUN ...]
#
# The benchmark of docs/benchmarks/hippocampus_cpu2d/ (same splits: 2 and 4 labeled cases, seed 0, 4 validation
# cases, the same 40 held-out test cases; 2d, budget cpu2d, EMA bounds) with the semi-supervised trainers TRAINERS
# (online) and CACHED_TRAINERS (trained from an offline generalist cache; a trainer with a pre-stage, such as
# nnUNetTrainerSFR, makes its own). PRESTAGE_OPTIONS is one item of the benchmark's --prestage-options, e.g.
# 'nnUNetTrainerSFR=--iterations 300'. RUN names the runs to make, in order (default: every run of the study);
# with none left to make, the report is written. GENERALIST sets the cache's generalist (JSON; default
# LiteMedSAM). Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results exported and Dataset004_Hippocampus converted
# and planned for 2d (CONFIGURATION=2d bash benchmarks/hippocampus.sh does both). Finished runs are skipped, a killed
# one resumes.
set -euo pipefail
OUTPUT=${1:?usage: hippocampus_rows.sh OUTPUT [RUN ...]}
shift
NP=${NNUNET_NP:-2}
: "${nnUNet_raw:?export nnUNet_raw}" "${nnUNet_preprocessed:?export nnUNet_preprocessed}" "${nnUNet_results:?export nnUNet_results}"
export nnUNet_extTrainer=${nnUNet_extTrainer:-$(nnunet-foundation trainer-path)}

# shellcheck disable=SC2206
ARGS=(-d 4 -c 2d --labeled 2 4 --seeds 0 --num-val 4 --test-cases 40 --test-seed 0 --trainers ${TRAINERS:-}
      --budget cpu2d --device cpu -np "$NP" --output "$OUTPUT")
# shellcheck disable=SC2206
[ -z "${CACHED_TRAINERS:-}" ] || ARGS+=(--cached-trainers $CACHED_TRAINERS)
[ -z "${PRESTAGE_OPTIONS:-}" ] || ARGS+=(--prestage-options "$PRESTAGE_OPTIONS")
[ -z "${GENERALIST:-}" ] || ARGS+=(--pseudo-label-generalist "$GENERALIST")
RUNS=("$@")
if [ ${#RUNS[@]} -eq 0 ]; then
    nnunet-foundation benchmark "${ARGS[@]}"
    exit
fi
for RUN in "${RUNS[@]}"; do
    echo "== $(date) run $RUN (log: $OUTPUT/logs)"
    nnunet-foundation benchmark "${ARGS[@]}" --run "$RUN"
done
echo "== report: $OUTPUT/report.md"
nnunet-foundation benchmark "${ARGS[@]}" --report-only
