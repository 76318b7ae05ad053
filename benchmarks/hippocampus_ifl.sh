#!/usr/bin/env bash
# IFL's rows in the Hippocampus study (issue 16; docs/benchmarks/hippocampus_ifl_cpu2d/) in one command:
#
#   bash benchmarks/hippocampus_ifl.sh OUTPUT [RUN ...]
#
# The 2d CPU Hippocampus study (benchmarks/hippocampus_rows.sh: the splits, test cases and budget of
# docs/benchmarks/hippocampus_cpu2d/) with nnUNetTrainerIFLRound1: its row runs `nnunet-foundation ifl --rounds 1`
# for the fold (round 0 = the fold's labeled-only run, LiteMedSAM walking from key slices the labeled-only model
# chose, then nnU-Net retrained on labeled + pseudo-labelled cases, warm-started). RUN names the runs to make, in
# order (default: the 4-labeled fold's two rows and the fully supervised bound, what fits a CPU session); with none
# left to make, the report is written. GENERALIST sets IFL's generalist (JSON; default LiteMedSAM unstitched;
# '{"backend": "litemedsam", "stitch": true}' walks 56 x 40 slices about 5x cheaper, less accurately). Needs
# nnUNet_raw / nnUNet_preprocessed / nnUNet_results exported and Dataset004_Hippocampus converted and planned for 2d
# (CONFIGURATION=2d bash benchmarks/hippocampus.sh does both). Finished runs are skipped, a killed one resumes.
set -euo pipefail
OUTPUT=${1:?usage: hippocampus_ifl.sh OUTPUT [RUN ...]}
shift
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(labeled-4_seed-0_nnUNetTrainerEMA_cpu2d labeled-4_seed-0_nnUNetTrainerIFLRound1_cpu2d
                               labeled-all_seed-0_nnUNetTrainerEMA_cpu2d)
TRAINERS=nnUNetTrainerIFLRound1 CACHED_TRAINERS="" PRESTAGE_OPTIONS="" \
    exec bash "$(dirname "$0")/hippocampus_rows.sh" "$OUTPUT" "${RUNS[@]}"
