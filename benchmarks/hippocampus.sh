#!/usr/bin/env bash
# Reproduces the committed Hippocampus benchmark (docs/benchmarks/hippocampus_<budget>/) in one command:
#
#   bash benchmarks/hippocampus.sh DEVICE BUDGET OUTPUT [PARALLEL_JOBS]
#
#   DEVICE         cpu or cuda
#   BUDGET         a budget name (cpu2d, gpu1k, ...; see README "Budgets")
#   OUTPUT         folder for the benchmark's report, predictions and logs
#   PARALLEL_JOBS  runs trained at the same time (default 1). On one GPU several short runs share the card well:
#                  nnU-Net's CPU data augmentation, not the GPU, limits a single small-patch run.
#
# CONFIGURATION (default 3d_fullres) picks the nnU-Net configuration; the CPU study uses CONFIGURATION=2d with the
# cpu2d budget, because 3d_fullres learns too slowly for a CPU session (see docs/benchmarks/hippocampus_cpu2d/README.md).
# Needs nnUNet_raw, nnUNet_preprocessed and nnUNet_results exported, and the MSD data at $HIPPOCAMPUS_MSD
# (default ../shared/data/Task04_Hippocampus). Converting and planning are skipped when already done; finished runs
# are skipped and a killed run resumes, so the same command continues an interrupted benchmark.
# With COST_JSON=file, the trainer cost table (benchmarks/trainer_cost.py, measured before any training starts so
# that nothing else shares the machine) goes into the report; an existing file is reused. COST_TRAINERS adds trainers
# to it (SAM-guided ones need their generalist configured), COST_ARGS adds options (on a CPU: --batch-size 2).
set -euo pipefail
DEVICE=${1:?usage: hippocampus.sh DEVICE BUDGET OUTPUT [PARALLEL_JOBS]}
BUDGET=${2:?usage: hippocampus.sh DEVICE BUDGET OUTPUT [PARALLEL_JOBS]}
OUTPUT=${3:?usage: hippocampus.sh DEVICE BUDGET OUTPUT [PARALLEL_JOBS]}
JOBS=${4:-1}
MSD=${HIPPOCAMPUS_MSD:-$(dirname "$0")/../../shared/data/Task04_Hippocampus}
CONFIGURATION=${CONFIGURATION:-3d_fullres}
NP=${NNUNET_NP:-$(( $(nproc) > 8 ? 8 : $(nproc) ))}
PLAN_NP=$(( NP > 0 ? NP : 1 ))  # NNUNET_NP=0 (no augmentation workers) is fine for training, not for preprocessing
preprocessed_cases() { find "$1" -maxdepth 1 -name '*.pkl' 2>/dev/null | wc -l; }
training_cases() { python -c 'import json, sys; print(json.load(open(sys.argv[1] + "/dataset.json"))["numTraining"])' "$1"; }
: "${nnUNet_raw:?export nnUNet_raw}" "${nnUNet_preprocessed:?export nnUNet_preprocessed}" "${nnUNet_results:?export nnUNet_results}"

# The benchmark's settings: two labeled counts, one seed, Mean Teacher and CPS against both bounds, 40 held-out
# test cases (never trained, validated or selected on), 4 validation cases per fold.
ARGS=(-d 4 -c "$CONFIGURATION" --labeled 2 4 --seeds 0 --num-val 4 --test-cases 40 --test-seed 0
      --trainers nnUNetTrainerMeanTeacher nnUNetTrainerCPS --budget "$BUDGET" --device "$DEVICE" -np "$NP"
      --output "$OUTPUT")

if [ ! -f "$nnUNet_raw/Dataset004_Hippocampus/dataset.json" ]; then
    echo "== converting $MSD into $nnUNet_raw/Dataset004_Hippocampus"
    nnUNetv2_convert_MSD_dataset -i "$MSD" -np "$PLAN_NP"
fi
# an interrupted preprocessing leaves the folder with fewer cases than dataset.json: preprocess again
if [ "$(preprocessed_cases "$nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans_$CONFIGURATION")" -lt "$(training_cases "$nnUNet_raw/Dataset004_Hippocampus")" ]; then
    echo "== planning and preprocessing ($CONFIGURATION)"
    nnUNetv2_plan_and_preprocess -d 4 -c "$CONFIGURATION" -np "$PLAN_NP"
fi

# Prepare once (splits, held-out test data) and write one job line per unfinished run.

JOBFILE="${OUTPUT%/}.jobs.sh"  # beside OUTPUT: the benchmark only adopts an empty or its own folder
nnunet-foundation benchmark "${ARGS[@]}" --print-commands > "$JOBFILE"
COST=()
if [ -n "${COST_JSON:-}" ]; then
    export nnUNet_extTrainer=${nnUNet_extTrainer:-$(nnunet-foundation trainer-path)}
    if [ ! -f "$COST_JSON" ]; then
        echo "== trainer cost (fold 0: 2 labeled cases + unlabeled), before any training"
        python "$(dirname "$0")/trainer_cost.py" -d 4 -c "$CONFIGURATION" -f 0 --device "$DEVICE" \
            --trainers nnUNetTrainerMeanTeacher nnUNetTrainerUAMT nnUNetTrainerCPS ${COST_TRAINERS:-} ${COST_ARGS:-} \
            --json "$COST_JSON"
    fi
    COST=(--cost "$COST_JSON")
fi
if [ "$JOBS" -gt 1 ]; then
    echo "== $(grep -c -- ' --run ' "$JOBFILE" || true) runs, $JOBS at a time (logs in $OUTPUT/logs)"
    grep -- ' --run ' "$JOBFILE" | xargs -P "$JOBS" -I{} bash -c '{} > /dev/null 2>&1 || echo "job failed: {}"'
fi
# Sequential runs (JOBS=1), or whatever a failed parallel job left, then the report.
nnunet-foundation benchmark "${ARGS[@]}" "${COST[@]}"
