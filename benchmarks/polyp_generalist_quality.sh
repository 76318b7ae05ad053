#!/usr/bin/env bash
# The polyp generalist-quality table of issues 12 and 22 (docs/benchmarks/generalist_quality_polyps/) in one command:
#
#   bash benchmarks/polyp_generalist_quality.sh OUTPUT
#
# 1. the polyp study's data and splits (benchmarks/polyps.sh steps 1-2, then `benchmark --print-commands`, which
#    writes the splits without training anything): Dataset150_Polyps at 128 px, fold 1 = 4 labeled Kvasir-SEG images
#    (seed 0), its unlabeled pool of 949 Kvasir-SEG and CVC-ClinicDB images;
# 2. the prompting specialist: that fold's labeled-only nnU-Net (nnUNetTrainer_cpu2dpolyps, the study's budget:
#    500 iterations at batch 4; its last weights, as when the table was measured: --no-ema-baselines), trained
#    through the benchmark's own job line (which also scores it on the test set);
# 3. generalist-quality on images of fold 1's unlabeled pool (never seen by the specialist, labels used only to
#    score): 40 Kvasir-SEG (in-domain: every 14th by name) and 20 CVC-ClinicDB (cross-domain: every 16th by name),
#    LiteMedSAM prompted from the labels (oracle), by the specialist (plain and one prompt per component filtered by
#    score), and by region proposals (agreement, and a head fitted on the 4 labeled images);
#    and (Kvasir-SEG only) a copy of LiteMedSAM fine-tuned on the 4 labeled images;
#    reports in OUTPUT/{kvasir,kvasir_components,kvasir_localiser,cvc,cvc_components}.
#
# Needs nnUNet_raw, nnUNet_preprocessed, nnUNet_results exported (POLYPS_DATA: the data folder). About 1.5 h on two
# idle CPU cores, most of it the region proposals (38 decoder passes per image).
set -euo pipefail
OUTPUT=${1:?usage: polyp_generalist_quality.sh OUTPUT}
HERE=$(cd "$(dirname "$0")" && pwd)
: "${nnUNet_raw:?export nnUNet_raw}" "${nnUNet_preprocessed:?export nnUNet_preprocessed}" "${nnUNet_results:?export nnUNet_results}"
mkdir -p "$OUTPUT"
export POLYPS_DATA=${POLYPS_DATA:-$HERE/../../shared/data/Polyps}

# steps 1-2 of the polyp study (conversion, planning) and its split, without running the study
sed -n '/^echo "== \[$(elapsed)\] benchmark/q;p' "$HERE/polyps.sh" > "$OUTPUT/prepare.sh"
bash "$OUTPUT/prepare.sh" cpu cpu2dpolyps "$OUTPUT/study"
ARGS=(-d 150 -c 2d --labeled 2 4 8 --seeds 0 1 --other-seeds-at 4 --num-val 4 --test-fraction kvasir=0.25 cvc=0.33
      --test-seed 0 --labeled-domain kvasir --trainers nnUNetTrainerMeanTeacher nnUNetTrainerCPS --budget cpu2dpolyps
      --tolerance 2 --device cpu -np 2 --output "$OUTPUT/study" --no-ema-baselines)
nnunet-foundation benchmark "${ARGS[@]}" --print-commands > "$OUTPUT/study.jobs.sh"
nnunet-foundation benchmark "${ARGS[@]}" --run labeled-4_seed-0_nnUNetTrainer_cpu2dpolyps

read -r -a KVASIR < <(python - <<'EOF'
import json, os
fold = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset150_Polyps", "splits_final.json")))[1]
print(" ".join([c for c in sorted(fold["unlabeled"]) if c.startswith("kvasir")][::14][:40]))
EOF
)
read -r -a CVC < <(python - <<'EOF'
import json, os
fold = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset150_Polyps", "splits_final.json")))[1]
print(" ".join([c for c in sorted(fold["unlabeled"]) if c.startswith("cvc")][::16][:20]))
EOF
)
MODEL=(-d 150 -c 2d -tr nnUNetTrainer_cpu2dpolyps -f 1)
COMPONENTS='{"backend": "litemedsam", "box_mode": "components", "min_prompt_score": 0.5}'
for domain in kvasir cvc; do
    if [ "$domain" = kvasir ]; then CASES=("${KVASIR[@]}"); else CASES=("${CVC[@]}"); fi
    nnunet-foundation generalist-quality "${MODEL[@]}" --cases "${CASES[@]}" \
        --modes oracle specialist proposals proposals-head -o "$OUTPUT/$domain"
    nnunet-foundation generalist-quality "${MODEL[@]}" --cases "${CASES[@]}" --modes specialist \
        --generalists "$COMPONENTS" -o "$OUTPUT/${domain}_components"
done
# lever 4: a copy of LiteMedSAM fine-tuned on the 4 labeled images (60 steps), alone and prompting the frozen one
nnunet-foundation generalist-quality "${MODEL[@]}" --cases "${KVASIR[@]}" --modes localiser localiser-alone \
    -o "$OUTPUT/kvasir_localiser"
nnunet-foundation generalist-quality "${MODEL[@]}" --cases "${CVC[@]}" --modes localiser localiser-alone \
    -o "$OUTPUT/cvc_localiser"
echo "done: $OUTPUT/{kvasir,kvasir_components,kvasir_localiser,cvc,cvc_components,cvc_localiser}/generalist_quality.md"
