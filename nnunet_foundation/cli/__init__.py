"""``nnunet-foundation``: one command, several subcommands (see ``nnunet-foundation --help``)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules; each exposes register(subparsers) and sets func=callable(args) -> exit code
SUBCOMMAND_MODULES = [
    "nnunet_foundation.cli.trainer_path",
    "nnunet_foundation.cli.preprocess_unlabeled",
    "nnunet_foundation.cli.check",
    "nnunet_foundation.cli.convert_2d",
    "nnunet_foundation.cli.convert_multiphase",
    "nnunet_foundation.cli.multimodal_plans",
    "nnunet_foundation.cli.splits",
    "nnunet_foundation.cli.demo",
    "nnunet_foundation.cli.evaluate",
    "nnunet_foundation.cli.benchmark",
    "nnunet_foundation.cli.predict_sam_student",
    "nnunet_foundation.cli.generalist_quality",
    "nnunet_foundation.cli.pseudo_label",
    "nnunet_foundation.cli.predict_generalist",
    "nnunet_foundation.cli.weak_labels",
    "nnunet_foundation.cli.sfr",
    "nnunet_foundation.cli.ifl",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-foundation",
        description="Label-efficient nnU-Net v2: semi-supervised and foundation-model guided trainers. Training and "
                    "inference use the stock nnUNetv2_train / nnUNetv2_predict commands with "
                    "nnUNet_extTrainer=$(nnunet-foundation trainer-path).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
