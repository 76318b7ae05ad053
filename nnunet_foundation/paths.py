"""Where things live: the trainer re-export folder and the unlabeled-data folder names."""
from __future__ import annotations

import os
from pathlib import Path

#: Raw unlabeled scans sit next to imagesTr, named like imagesTr (CASE_XXXX.<file_ending>).
UNLABELED_RAW_FOLDER = "imagesUnlabeled"
#: Preprocessed unlabeled scans go next to the configuration's preprocessed folder, with this suffix, so that
#: nnU-Net's own code (splits, validation, unpacking) never sees them.
UNLABELED_PREPROCESSED_SUFFIX = "_unlabeled"
#: Written into the preprocessed unlabeled folder: which plans produced it.
UNLABELED_METADATA_FILE = "unlabeled_preprocessing.json"


def trainer_path() -> Path:
    """The folder to put into ``nnUNet_extTrainer`` so nnU-Net finds this package's trainers."""
    folder = Path(__file__).resolve().parent.parent / "trainers"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: nnunet-foundation must be installed from its repository in editable mode "
            f"(bash setup_scripts/setup_env.sh, or pip install -e <repo>) so that the trainers/ folder is available.")
    return folder


def unlabeled_preprocessed_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder_base, data_identifier + UNLABELED_PREPROCESSED_SUFFIX)
