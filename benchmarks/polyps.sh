#!/usr/bin/env bash
# The two-domain polyp study of issue 14 (Kvasir-SEG in-domain, CVC-ClinicDB cross-domain) in one command:
#
#   bash benchmarks/polyps.sh DEVICE BUDGET OUTPUT [PARALLEL_JOBS]
#
#   DEVICE         cpu or cuda
#   BUDGET         a budget name (cpu2dpolyps on 2 CPU cores; gpu1k, gpu10k on a GPU; see README "Budgets")
#   OUTPUT         folder for the benchmark's report, predictions and logs
#   PARALLEL_JOBS  runs trained at the same time (default 1)
#
# Steps, each skipped when already done (rerun the same command to continue an interrupted study):
#  1. convert $POLYPS_DATA (default ../shared/data/Polyps; read its README for the licences: research use, cite
#     Jha et al. 2020 and Bernal et al. 2015) into $nnUNet_raw/Dataset150_Polyps with convert-2d: RGB PNGs with the
#     longest side shrunk to MAX_SIZE (default 128) pixels, 0/1 masks, domains kvasir and cvc, CVC frames grouped by
#     their video sequence (domains.json);
#  2. plan and preprocess the 2d configuration (nnU-Net plans a 112 x 128 patch, 5 stages, for MAX_SIZE=128);
#  3. the benchmark: labeled sets of 2, 4 and 8 Kvasir-SEG images (nested; seed 0, and seed 1 at 4 labeled images),
#     4 Kvasir-SEG validation images per seed, every other non-test image of both sets unlabeled (a mixed-domain
#     pool; all of them labeled for the fully supervised row), test set = 25% of the Kvasir-SEG images (in-domain)
#     and a third of the CVC-ClinicDB video sequences, whole (cross-domain), reported separately and pooled.
#     Every nnU-Net row trains for the same budget. HD95 is in pixels of the resized images (PNG has no spacing)
#     and NSD uses a 2-pixel tolerance.
#
# CPU budget (2 cores), `bash benchmarks/polyps.sh cpu cpu2dpolyps OUTPUT`: 20 epochs x 25 iterations = 500
# iterations at batch 4 (+ 4 unlabeled) of 112 x 128 patches for every nnU-Net row. The online rows (labeled-only,
# Mean Teacher, CPS, MixedDomain; fully supervised) are 4 scarce folds x 4 + 2 = 18 trainings, each followed by the
# prediction of the ~344 test images; labeled-only, Mean Teacher, CPS and fully supervised alone were estimated at
# 1.5-2 hours on an otherwise idle 2-core machine (docs/benchmarks/polyps_cpu_budget.md: cost per iteration measured
# on this data, times the runs); MixedDomain adds a teacher-student training per fold (the report times it). SemiSAM learns
# from an offline LiteMedSAM cache (--cached-trainers): per scarce fold, the fold's labeled-only model prompts
# LiteMedSAM once over the unlabeled pool (nnunet-foundation pseudo-label; about 0.9 s per image on two cores, so
# roughly 15 minutes per fold for the ~930 unlabeled images, 4 folds), then SemiSAM trains with the cache as a
# cross-entropy target of weight 1 for the whole run (nnUNet_ssl_sam_* below, unless set). With it the CPU study
# exceeds 3 hours; CACHED_TRAINERS="" leaves it out. Measured per scarce fold on a 2-core Intel Xeon, each run alone
# (docs/benchmarks/polyps_cpu_xeon; training + the test-set predictions): labeled-only about 8 min, Mean Teacher 11,
# CPS 15.5, SemiSAM 23 (12 of them the cache), self-training 10 (same cache), the generalist row 4: about 72 min
# per fold without MixedDomain, so about 5 hours for the 4 scarce folds and the 2 fully supervised runs (8 min each). The self-training row learns from the same cache. The generalist
# alone (--generalist-row: the cache's generalist prompted by each fold's labeled-only model on the test images; no
# training) is one more row; GENERALIST_ROW=0 leaves it out. Add trainers with TRAINERS="..."; the estimate says what
# each costs. The report's "Training
# time" table shows the real seconds per epoch after the first runs.
#
# Needs nnUNet_raw, nnUNet_preprocessed and nnUNet_results exported. TRAINERS overrides the semi-supervised trainers
# ("" for none; default: nnUNetTrainerMeanTeacher nnUNetTrainerCPS nnUNetTrainerMixedDomain - issue 19's
# mixed-domain method, never told the domains; nnUNetTrainerSCSAM adds SC-SAM's nnU-Net and, as its own row, the
# SAM it co-trains (predict-sam-student; docs/benchmarks/polyps_scsam_cpu ran it with nnUNet_ssl_lora_rank=0,
# about 4-5 min per epoch on two cores); add nnUNetTrainerIFLRound1 nnUNetTrainerIFLRound2 for IFL's rounds: round r's LiteMedSAM
# labels prompted by round r-1's model, each round about 15 min of labels + one training; round 1 is self-training
# warm-started from the labeled-only model), CACHED_TRAINERS those trained from the LiteMedSAM cache
# (default: nnUNetTrainerSemiSAM nnUNetTrainerSelfTraining; add nnUNetTrainerSemiSAMMixedDomain for the SemiSAM term on
# MixedDomain, as in docs/benchmarks/polyps_cpu), PSEUDO_LABEL_GENERALIST that cache's generalist
# (JSON; default LiteMedSAM), PRESTAGE_OPTIONS one item of the benchmark's --prestage-options (e.g.
# 'nnUNetTrainerSFR=--iterations 300' with CACHED_TRAINERS=nnUNetTrainerSFR), MAX_SIZE the image size, NNUNET_NP the
# worker processes. RUNS="RUN_ID ..." makes only those runs, in order, then the report of what has finished (the
# partial CPU studies in docs/benchmarks/polyps_* name theirs).
set -euo pipefail
DEVICE=${1:?usage: polyps.sh DEVICE BUDGET OUTPUT [PARALLEL_JOBS]}
BUDGET=${2:?usage: polyps.sh DEVICE BUDGET OUTPUT [PARALLEL_JOBS]}
OUTPUT=${3:?usage: polyps.sh DEVICE BUDGET OUTPUT [PARALLEL_JOBS]}
JOBS=${4:-1}
DATA=${POLYPS_DATA:-$(dirname "$0")/../../shared/data/Polyps}
MAX_SIZE=${MAX_SIZE:-128}
TRAINERS=${TRAINERS-nnUNetTrainerMeanTeacher nnUNetTrainerCPS nnUNetTrainerMixedDomain}
CACHED_TRAINERS=${CACHED_TRAINERS-nnUNetTrainerSemiSAM nnUNetTrainerSelfTraining}
# SemiSAM from a cache made once: the labels stay as good as they were, so they weigh fully for the whole run
export nnUNet_ssl_sam_loss=${nnUNet_ssl_sam_loss:-ce} nnUNet_ssl_sam_weight=${nnUNet_ssl_sam_weight:-1} \
    nnUNet_ssl_sam_decay=${nnUNet_ssl_sam_decay:-0} nnUNet_ssl_sam_all_scales=${nnUNet_ssl_sam_all_scales:-true}
NP=${NNUNET_NP:-$(( $(nproc) > 8 ? 8 : $(nproc) ))}
PLAN_NP=$(( NP > 0 ? NP : 1 ))  # NNUNET_NP=0 (no augmentation workers) is fine for training, not for preprocessing
preprocessed_cases() { find "$1" -maxdepth 1 -name '*.pkl' 2>/dev/null | wc -l; }
training_cases() { python -c 'import json, sys; print(json.load(open(sys.argv[1] + "/dataset.json"))["numTraining"])' "$1"; }
: "${nnUNet_raw:?export nnUNet_raw}" "${nnUNet_preprocessed:?export nnUNet_preprocessed}" "${nnUNet_results:?export nnUNet_results}"
START=$(date +%s)
elapsed() { local s=$(( $(date +%s) - START )); printf '%d:%02d:%02d' $((s / 3600)) $((s / 60 % 60)) $((s % 60)); }

# shellcheck disable=SC2206
ARGS=(-d 150 -c 2d --labeled 2 4 8 --seeds 0 1 --other-seeds-at 4 --num-val 4
      --test-fraction kvasir=0.25 cvc=0.33 --test-seed 0 --labeled-domain kvasir
      --trainers $TRAINERS --budget "$BUDGET" --tolerance 2 --device "$DEVICE" -np "$NP" --output "$OUTPUT")
if [ -n "$CACHED_TRAINERS" ]; then
    # shellcheck disable=SC2206
    ARGS+=(--cached-trainers $CACHED_TRAINERS)
fi
[ "${GENERALIST_ROW:-1}" != 0 ] && ARGS+=(--generalist-row)
[ -n "${PRESTAGE_OPTIONS:-}" ] && ARGS+=(--prestage-options "$PRESTAGE_OPTIONS")
if [ -n "$CACHED_TRAINERS" ] || [ "${GENERALIST_ROW:-1}" != 0 ]; then
    [ -n "${PSEUDO_LABEL_GENERALIST:-}" ] && ARGS+=(--pseudo-label-generalist "$PSEUDO_LABEL_GENERALIST")
fi

echo "== [$(elapsed)] converting $DATA into $nnUNet_raw/Dataset150_Polyps (longest side $MAX_SIZE px; unchanged if done)"
nnunet-foundation convert-2d -d 150 --name Polyps --label-name polyp --max-size "$MAX_SIZE" \
    --source "kvasir=$DATA/Kvasir-SEG/images:$DATA/Kvasir-SEG/masks" \
    --source "cvc=$DATA/CVC-ClinicDB/images:$DATA/CVC-ClinicDB/masks" --groups cvc=cvc-clinicdb \
    --licence "research and education only; cite Jha et al. 2020 (Kvasir-SEG) and Bernal et al. 2015 (CVC-ClinicDB)"
# an interrupted preprocessing leaves the folder with fewer cases than dataset.json: preprocess again
if [ "$(preprocessed_cases "$nnUNet_preprocessed/Dataset150_Polyps/nnUNetPlans_2d")" -lt "$(training_cases "$nnUNet_raw/Dataset150_Polyps")" ]; then
    echo "== [$(elapsed)] planning and preprocessing (2d)"
    nnUNetv2_plan_and_preprocess -d 150 -c 2d -np "$PLAN_NP"
fi

echo "== [$(elapsed)] benchmark: splits, held-out test data, one job line per unfinished run"
JOBFILE="${OUTPUT%/}.jobs.sh"  # beside OUTPUT: the benchmark only adopts an empty or its own folder
nnunet-foundation benchmark "${ARGS[@]}" --print-commands > "$JOBFILE"
if [ -n "${RUNS:-}" ]; then
    for RUN in $RUNS; do
        echo "== [$(elapsed)] run $RUN (log: $OUTPUT/logs)"
        nnunet-foundation benchmark "${ARGS[@]}" --run "$RUN"
    done
    nnunet-foundation benchmark "${ARGS[@]}" --report-only
    echo "== [$(elapsed)] done: $OUTPUT/report.md"
    exit
fi
if [ "$JOBS" -gt 1 ]; then
    echo "== [$(elapsed)] $(grep -c -- ' --run ' "$JOBFILE" || true) runs, $JOBS at a time (logs in $OUTPUT/logs)"
    # the cached and generalist rows wait for their fold's labeled-only model: the sequential call below runs them
    CACHED_PATTERN='\+generalist$'
    [ -n "$CACHED_TRAINERS" ] && CACHED_PATTERN="_($(echo $CACHED_TRAINERS | tr -s ' ' '|'))_|$CACHED_PATTERN"
    grep -- ' --run ' "$JOBFILE" | grep -v -E -- "$CACHED_PATTERN" |
        xargs -P "$JOBS" -I{} bash -c '{} > /dev/null 2>&1 || echo "job failed: {}"'
fi
# Sequential runs (JOBS=1; each prints its epochs and test metrics), or what a failed parallel job left, then the report.
nnunet-foundation benchmark "${ARGS[@]}"
echo "== [$(elapsed)] done: $OUTPUT/report.md"
