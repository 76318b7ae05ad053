#!/usr/bin/env bash
# Download official foundation-model checkpoints on a machine with internet, for nnunet-foundation's generalists.
#
#   bash setup_scripts/download_checkpoints.sh [TARGET_FOLDER] [MODEL ...]
#
# TARGET_FOLDER defaults to ./checkpoints. MODELs (default: sam_vit_b sam2.1_hiera_tiny):
#   sam_vit_b sam_vit_l sam_vit_h                   segment-anything (Kirillov et al. 2023), Apache-2.0
#   sam2.1_hiera_tiny sam2.1_hiera_small sam2.1_hiera_base_plus sam2.1_hiera_large   SAM 2.1, Apache-2.0
#   medsam_vit_b                                    MedSAM (Ma et al. 2024): hosted on Google Drive, see below
# Existing complete files are kept; files are downloaded to a temporary name and moved into place only when complete,
# so an interrupted download never leaves a truncated checkpoint behind. Copy the folder to offline training nodes
# and point the generalist's "checkpoint" to the file (README, "SAM-guided training").
set -euo pipefail
TARGET=${1:-checkpoints}
shift || true
MODELS=("$@")
[ ${#MODELS[@]} -eq 0 ] && MODELS=(sam_vit_b sam2.1_hiera_tiny)
SAM=https://dl.fbaipublicfiles.com/segment_anything
SAM2=https://dl.fbaipublicfiles.com/segment_anything_2/092824
declare -A URL=(
  [sam_vit_b]=$SAM/sam_vit_b_01ec64.pth
  [sam_vit_l]=$SAM/sam_vit_l_0b3195.pth
  [sam_vit_h]=$SAM/sam_vit_h_4b8939.pth
  [sam2.1_hiera_tiny]=$SAM2/sam2.1_hiera_tiny.pt
  [sam2.1_hiera_small]=$SAM2/sam2.1_hiera_small.pt
  [sam2.1_hiera_base_plus]=$SAM2/sam2.1_hiera_base_plus.pt
  [sam2.1_hiera_large]=$SAM2/sam2.1_hiera_large.pt
)
mkdir -p "$TARGET"
for model in "${MODELS[@]}"; do
  if [ "$model" = medsam_vit_b ]; then
    echo "medsam_vit_b: download medsam_vit_b.pth from the MedSAM README (https://github.com/bowang-lab/MedSAM," \
         "'Model checkpoints') into $TARGET/ and configure it as {\"backend\": \"medsam\", \"model_type\": \"vit_b\"}."
    continue
  fi
  url=${URL[$model]:-}
  if [ -z "$url" ]; then
    echo "unknown model '$model'; choose from: ${!URL[*]} medsam_vit_b" >&2
    exit 2
  fi
  file="$TARGET/$(basename "$url")"
  if [ -s "$file" ]; then
    echo "$file exists, kept"
    continue
  fi
  echo "downloading $model -> $file"
  curl -fL --retry 3 --progress-bar -o "$file.part" "$url"
  mv "$file.part" "$file"
done
echo "done: $(ls "$TARGET")"
