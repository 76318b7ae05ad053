#!/usr/bin/env bash
# IFL's rows in the Hippocampus study (issue 16; docs/benchmarks/hippocampus_ifl_cpu2d/) in one command:
#
#   bash benchmarks/hippocampus_ifl.sh OUTPUT [RUN ...]
#
# The benchmark of docs/benchmarks/hippocampus_cpu2d/ (same splits: 2 and 4 labeled cases, seed 0, 4 validation
# cases, the same 40 held-out test cases; 2d, budget cpu2d, EMA bounds) with nnUNetTrainerIFLRound1: its row runs
# `nnunet-foundation ifl --rounds 1` for the fold (round 0 = the fold's labeled-only run, LiteMedSAM walking from
# key slices the labeled-only model chose, then nnU-Net retrained on labeled + pseudo-labelled cases, warm-started).
# RUN names the runs to make, in order (default: the 4-labeled fold's two rows and the fully supervised bound, what
# fits a CPU session); with none left to make, the report is written. GENERALIST sets IFL's generalist (JSON; default
# LiteMedSAM unstitched; '{"backend": "litemedsam", "stitch": true}' walks 56 x 40 slices about 5x cheaper, less
# accurately). Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results exported and Dataset004_Hippocampus converted
# and planned for 2d (CONFIGURATION=2d bash benchmarks/hippocampus.sh does both). Finished runs are skipped, a killed
# one resumes.
set -euo pipefail
OUTPUT=${1:?usage: hippocampus_ifl.sh OUTPUT [RUN ...]}
shift
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(labeled-4_seed-0_nnUNetTrainerEMA_cpu2d labeled-4_seed-0_nnUNetTrainerIFLRound1_cpu2d
                               labeled-all_seed-0_nnUNetTrainerEMA_cpu2d)
NP=${NNUNET_NP:-2}
: "${nnUNet_raw:?export nnUNet_raw}" "${nnUNet_preprocessed:?export nnUNet_preprocessed}" "${nnUNet_results:?export nnUNet_results}"
export nnUNet_extTrainer=${nnUNet_extTrainer:-$(nnunet-foundation trainer-path)}

ARGS=(-d 4 -c 2d --labeled 2 4 --seeds 0 --num-val 4 --test-cases 40 --test-seed 0 --trainers nnUNetTrainerIFLRound1
      --budget cpu2d --device cpu -np "$NP" --output "$OUTPUT")
[ -z "${GENERALIST:-}" ] || ARGS+=(--pseudo-label-generalist "$GENERALIST")
for RUN in "${RUNS[@]}"; do
    echo "== $(date) run $RUN (log: $OUTPUT/logs)"
    nnunet-foundation benchmark "${ARGS[@]}" --run "$RUN"
done
echo "== report: $OUTPUT/report.md"
nnunet-foundation benchmark "${ARGS[@]}" --report-only
