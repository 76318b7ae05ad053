"""``nnunet-foundation trainer-path``: print the folder for nnUNet_extTrainer."""
from __future__ import annotations


def run(args) -> int:
    from nnunet_foundation.paths import trainer_path

    path = trainer_path()
    print(f"export nnUNet_extTrainer={path}" if args.export else path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trainer-path", help="print the folder to put into nnUNet_extTrainer",
        description="Print the folder that holds this package's trainer re-exports. nnU-Net finds the trainers "
                    "(for training, DDP workers and inference) when nnUNet_extTrainer points there.",
        epilog="example:  export nnUNet_extTrainer=$(nnunet-foundation trainer-path)\n"
               "          eval \"$(nnunet-foundation trainer-path --export)\"",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--export", action="store_true", help="print an 'export nnUNet_extTrainer=...' line")
    p.set_defaults(func=run)
