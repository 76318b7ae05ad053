#!/usr/bin/env bash
# Issue 13's Hippocampus re-run (docs/benchmarks/hippocampus_cpu2d_ssl/) in one command:
#
#   bash benchmarks/hippocampus_ssl_signal.sh OUTPUT
#
# 1. the benchmark of docs/benchmarks/hippocampus_cpu2d/ (same splits: 2 and 4 labeled cases, seed 0, 4 validation
#    cases, the same 40 held-out test cases; 2d, budget cpu2d) with EMA bounds (nnUNetTrainerEMA, the default) and
#    UniMatch (TRAINERS overrides: e.g. TRAINERS="nnUNetTrainerUniMatch nnUNetTrainerMeanTeacher"). SEEDS=1 makes
#    the second seed's splits (same test cases): its splits_final.json and folds differ from seed 0's, so give it
#    nnUNet_preprocessed and nnUNet_results folders of its own (docs/benchmarks/hippocampus_cpu2d_ssl/seed1/);
# 2. the Mean Teacher weight sweep on fold 0 (2 labeled cases), scored on the fold's 4 VALIDATION cases only (never
#    the test set): unsup_weight in $MT_WEIGHTS (default "5 1") with the ramp-up ending at 30% of training, each a
#    separate nnU-Net results folder under OUTPUT/sweep (the benchmark's labeled-only run of that fold gives the
#    validation Dice to beat);
# 3. the CPS weight sweep on the same fold and validation cases: unsup_weight in $CPS_WEIGHTS (default none; e.g.
#    "1.5", the paper's constant weight) held constant from the first iteration (no ramp-up), as in the CPS paper;
# 4. the UniMatch confidence-threshold sweep on the same fold and validation cases: confidence_threshold in
#    $UNIMATCH_THRESHOLDS (default none; e.g. "0.8 0.7"). At 0.95 no foreground voxel was confident before t/T = 0.55
#    (docs/benchmarks/hippocampus_cpu2d_ssl/README.md), so the term taught background only for half of training.
#    $UNIMATCH_THRESHOLD_MODES (default none; e.g. "fixed self_adaptive_global") does the same for threshold_mode
#    (training/thresholds.py: FreeMatch's self-adaptive thresholds), the fixed rule at its default 0.95.
#    SWEEP_REPEATS=N (default 1) trains every sweep setting N times (run k > 1 in LABEL_rep<k>) and prints each run's
#    validation Dice and their mean: one run's spread on 4 validation cases (0.074 for CPS) exceeds the gains the
#    sweeps look for, so a setting is only chosen from repeated runs.
# 5. CPS_TEST_WEIGHT=W (default none; e.g. 1.5, the weight the sweep chose) adds CPS to step 1's benchmark, scored on
#    the test set with unsup_weight W held constant: a per-trainer section of an nnUNet_ssl_config file
#    (OUTPUT/cps_test_settings.json), so no other trainer of the benchmark changes; the report names the setting.
#
# Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results exported and Dataset004_Hippocampus converted and planned
# for 2d (benchmarks/hippocampus.sh does both). Finished runs are skipped, so the same command continues.
set -euo pipefail
OUTPUT=${1:?usage: hippocampus_ssl_signal.sh OUTPUT}
TRAINERS=${TRAINERS:-nnUNetTrainerUniMatch}
SEEDS=${SEEDS:-0}
MT_WEIGHTS=${MT_WEIGHTS-5 1}
UNIMATCH_THRESHOLDS=${UNIMATCH_THRESHOLDS-}
UNIMATCH_THRESHOLD_MODES=${UNIMATCH_THRESHOLD_MODES-}
SWEEP_REPEATS=${SWEEP_REPEATS:-1}
CPS_WEIGHTS=${CPS_WEIGHTS-}
CPS_TEST_WEIGHT=${CPS_TEST_WEIGHT-}
NP=${NNUNET_NP:-2}
: "${nnUNet_raw:?export nnUNet_raw}" "${nnUNet_preprocessed:?export nnUNet_preprocessed}" "${nnUNet_results:?export nnUNet_results}"
export nnUNet_extTrainer=${nnUNet_extTrainer:-$(nnunet-foundation trainer-path)}

if [ -n "$CPS_TEST_WEIGHT" ]; then
    if [ -n "${nnUNet_ssl_config:-}" ]; then  # replacing it would drop the user's settings without a word
        echo "error: CPS_TEST_WEIGHT writes its own nnUNet_ssl_config; unset nnUNet_ssl_config=$nnUNet_ssl_config" \
             "or add {\"nnUNetTrainerCPS\": {\"unsup_weight\": W, \"rampup_length\": 0.0}} to that file instead." >&2
        exit 2
    fi
    mkdir -p "$OUTPUT"
    echo "{\"nnUNetTrainerCPS\": {\"unsup_weight\": $CPS_TEST_WEIGHT, \"rampup_length\": 0.0}}" \
        > "$OUTPUT/cps_test_settings.json"
    export nnUNet_ssl_config="$OUTPUT/cps_test_settings.json"
    TRAINERS="$TRAINERS nnUNetTrainerCPS"
fi
# shellcheck disable=SC2206
ARGS=(-d 4 -c 2d --labeled 2 4 --seeds $SEEDS --num-val 4 --test-cases 40 --test-seed 0 --trainers $TRAINERS
      --budget cpu2d --device cpu -np "$NP" --output "$OUTPUT/bench")
echo "== benchmark (report: $OUTPUT/bench/report.md)"
nnunet-foundation benchmark "${ARGS[@]}"

# LABEL and nnU-Net validation summary.json files (one per run): prints each run's foreground Dice, and their mean
print_validation_dice() {
    python -c "import json,sys
dice = [json.load(open(f))['foreground_mean']['Dice'] for f in sys.argv[2:]]
runs = ', '.join(str(round(d, 4)) for d in dice)
print('validation Dice (fold 0, 4 cases), ' + sys.argv[1] + ':', runs if len(dice) == 1 else
      f'mean {sum(dice) / len(dice):.4f} over {len(dice)} runs ({runs})')" "$@"
}
# SWEEP_REPEATS validation runs of fold 0: LABEL, TRAINER, then the nnUNet_ssl_* settings that define it
sweep_run() {
    local label=$1 trainer=$2; shift 2
    local summaries=() repeat
    for repeat in $(seq 1 "$SWEEP_REPEATS"); do
        local folder="$OUTPUT/sweep/$label"
        [ "$repeat" -gt 1 ] && folder="${folder}_rep$repeat"
        local summary="$folder/Dataset004_Hippocampus/${trainer}__nnUNetPlans__2d/fold_0/validation/summary.json"
        if [ ! -f "$summary" ]; then
            echo "== $label (run $repeat of $SWEEP_REPEATS): $trainer with $*, fold 0 (log: $folder.log)"
            mkdir -p "$folder"
            env nnUNet_results="$folder" "$@" nnUNetv2_train 4 2d 0 -tr "$trainer" -device cpu > "$folder.log" 2>&1
        fi
        summaries+=("$summary")
    done
    print_validation_dice "$label" "${summaries[@]}"
}
# the Dice to beat: the benchmark's labeled-only run of fold 0 (2 labeled cases), on the same validation cases
baseline="$nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerEMA_cpu2d__nnUNetPlans__2d/fold_0/validation/summary.json"
print_validation_dice labeled-only "$baseline"
for weight in $MT_WEIGHTS; do
    sweep_run "mt_w${weight}_r0.3" nnUNetTrainerMeanTeacher_cpu2d nnUNet_ssl_unsup_weight="$weight" \
        nnUNet_ssl_rampup_length=0.3
done
for weight in $CPS_WEIGHTS; do
    sweep_run "cps_w${weight}_const" nnUNetTrainerCPS_cpu2d nnUNet_ssl_unsup_weight="$weight" nnUNet_ssl_rampup_length=0
done
for threshold in $UNIMATCH_THRESHOLDS; do
    sweep_run "unimatch_t${threshold}" nnUNetTrainerUniMatch_cpu2d nnUNet_ssl_confidence_threshold="$threshold"
done
for mode in $UNIMATCH_THRESHOLD_MODES; do
    sweep_run "unimatch_${mode}" nnUNetTrainerUniMatch_cpu2d nnUNet_ssl_threshold_mode="$mode"
done
