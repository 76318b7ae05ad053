#!/usr/bin/env bash
# Issue 19's multi-modal demo on real multi-channel data the project has offline: the polyp images' three colour
# channels as three "modalities" (one encoder stream each). Colour channels are not MRI sequences - the demo shows the
# method end to end on real data (plans, training, stock prediction, scores), not that it helps multi-modal MRI.
#
#   bash benchmarks/polyps_multimodal.sh DEVICE BUDGET OUTPUT [RUN_FILTER]
#
# Needs the polyp study's dataset (bash benchmarks/polyps.sh converts and plans it; nnUNet_* exported the same way).
# 1. nnunet-foundation multimodal-plans -d 150: nnUNetPlansMultiModal = the study's plans with MultiModalUNet (one
#    encoder per channel with squeeze-and-excitation, gated fusion per stage, nnU-Net's decoder); the preprocessed
#    data are shared;
# 2. the benchmark with -p nnUNetPlansMultiModal and exactly the polyp study's split settings (so its splits_final.json
#    and test set are the study's): labeled-only (nnUNetTrainerEMA with MultiModalUNet) and
#    nnUNetTrainerMultiModalSSL (+ each stream's prediction pulled towards the fused one on unlabeled images) at the
#    same budget as the study. RUN_FILTER (default: the 4-labeled, seed-0 fold and the seed-0 fully supervised run)
#    selects the runs; '.' runs all of them. Compare with the study's stock nnU-Net rows of the same fold.
set -euo pipefail
DEVICE=${1:?usage: polyps_multimodal.sh DEVICE BUDGET OUTPUT [RUN_FILTER]}
BUDGET=${2:?usage: polyps_multimodal.sh DEVICE BUDGET OUTPUT [RUN_FILTER]}
OUTPUT=${3:?usage: polyps_multimodal.sh DEVICE BUDGET OUTPUT [RUN_FILTER]}
FILTER=${4:-^labeled-(4_seed-0|all_seed-0)_}
NP=${NNUNET_NP:-$(( $(nproc) > 8 ? 8 : $(nproc) ))}
: "${nnUNet_raw:?export nnUNet_raw}" "${nnUNet_preprocessed:?export nnUNet_preprocessed}" "${nnUNet_results:?export nnUNet_results}"

nnunet-foundation multimodal-plans -d 150
ARGS=(-d 150 -c 2d -p nnUNetPlansMultiModal --labeled 2 4 8 --seeds 0 1 --other-seeds-at 4 --num-val 4
      --test-fraction kvasir=0.25 cvc=0.33 --test-seed 0 --labeled-domain kvasir
      --trainers nnUNetTrainerMultiModalSSL --budget "$BUDGET" --tolerance 2 --device "$DEVICE" -np "$NP"
      --output "$OUTPUT")
JOBFILE="${OUTPUT%/}.jobs.sh"
nnunet-foundation benchmark "${ARGS[@]}" --print-commands > "$JOBFILE"
for run in $(grep -o -- '--run [^ ]*$' "$JOBFILE" | cut -d' ' -f2 | grep -E -- "$FILTER"); do
    nnunet-foundation benchmark "${ARGS[@]}" --run "$run"
done
nnunet-foundation benchmark "${ARGS[@]}" --report-only
echo "done: $OUTPUT/report.md"
