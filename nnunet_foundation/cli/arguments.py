"""Arguments shared by the commands that run a generalist on a dataset's preprocessed cases."""
from __future__ import annotations

import argparse
import os
from typing import Tuple


def add_dataset_and_generalist_arguments(p: argparse.ArgumentParser) -> None:
    """``-d -c -p --generalists -device``: which preprocessed data, which generalist, where to run."""
    p.add_argument("-d", required=True, help="dataset name or ID (planned and preprocessed)")
    p.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--generalists", default=None,
                   help="generalist configuration: JSON object (a JSON list where the command takes several) or a "
                        "JSON file; default: LiteMedSAM (the package's default generalist)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda"), help="device for the models")


def add_prompting_model_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """``-tr -chk``: the trained nnU-Net model whose prediction prompts the generalist (folds: per command)."""
    p.add_argument("-tr", required=required, default=None,
                   help="trainer of the trained nnU-Net model that prompts the generalist")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint of that model")


def generalists_for_dataset(setting, what: str, base: str, configuration: dict) -> list:
    """``generalists_for_configuration`` with the dataset's own default: a natural RGB image (channels R, G, B in the
    preprocessed ``dataset.json``) is shown to the generalist in colour unless the setting names a channel."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_foundation.foundation.config import colour_defaults, generalists_for_configuration

    return generalists_for_configuration(setting, what, configuration,
                                         **colour_defaults(load_json(os.path.join(base, "dataset.json"))))


def load_configuration(dataset: str, plans_identifier: str, configuration: str) -> Tuple[str, str, dict, dict]:
    """``(dataset name, preprocessed dataset folder, plans, configuration entry)``; errors name the fix."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset)
    base = os.path.join(nnUNet_preprocessed, name)
    plans_file = os.path.join(base, f"{plans_identifier}.json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans = load_json(plans_file)
    if configuration not in plans["configurations"]:
        raise KeyError(f"configuration {configuration!r} is not in {plans_file}; it has "
                       f"{', '.join(plans['configurations'])}")
    entry = plans["configurations"][configuration]
    if not os.path.isdir(os.path.join(base, entry["data_identifier"])):
        raise FileNotFoundError(f"{os.path.join(base, entry['data_identifier'])} does not exist: run "
                                f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} first")
    return name, base, plans, entry
