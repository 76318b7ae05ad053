"""``nnunet-foundation convert-2d``: image/mask folders (one pair per domain) -> an nnU-Net raw dataset."""
from __future__ import annotations

import argparse
import sys


def run(args) -> int:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    from nnunet_foundation.convert2d import (ConversionError, DEFAULT_THRESHOLD, convert_2d, parse_source)

    try:
        if not nnUNet_raw.is_set():
            raise ConversionError("nnUNet_raw is not set: export it as for any nnU-Net command (the dataset is "
                                  "written to $nnUNet_raw/DatasetXXX_NAME)")
        sources = [parse_source(s) for s in args.source]
        result = convert_2d(sources, nnUNet_raw.require(), args.d, args.name, max_size=args.max_size,
                            threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
                            label_name=args.label_name, group_rules=args.groups or (), licence=args.licence,
                            force=args.force,
                            progress_every=args.progress_every)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["status"] == "replaced" and nnUNet_preprocessed.is_set():
        import os

        stale = os.path.join(nnUNet_preprocessed.require(), os.path.basename(result["folder"]))
        if os.path.isdir(stale):
            print(f"note: {stale} was made from the replaced dataset: rerun nnUNetv2_plan_and_preprocess -d {args.d}, "
                  f"and its splits_final.json may name cases that no longer exist")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-2d", help="convert image/mask folders (one pair per domain) into an nnU-Net raw 2D RGB dataset",
        description="Write $nnUNet_raw/DatasetXXX_NAME from folders of 2D images (png, jpg, bmp, tif) and binary "
                    "masks paired by file name (image a/b/x.jpg <-> mask c/d/x.png), one --source per domain. "
                    "Images become RGB PNGs read by nnU-Net's NaturalImage2DIO (imagesTr/<case>_0000.png, "
                    "channels R, G, B), masks 0/1 PNGs (labelsTr/<case>.png, mask value > --threshold is "
                    "foreground). Case ids are <domain>_<file stem>. domains.json beside dataset.json records each "
                    "case's domain, group (--groups), source files and original size; nnU-Net never reads it. "
                    "Every problem (image without mask or mask without image, unreadable file, mask of another "
                    "size, non-binary mask) stops the conversion before the dataset folder is touched. Rerunning "
                    "with the same files and options changes nothing; a different dataset at that id is only "
                    "replaced with --force.",
        epilog="example (Kvasir-SEG and CVC-ClinicDB, CVC frames grouped by video sequence):\n"
               "  nnunet-foundation convert-2d -d 150 --name Polyps --label-name polyp --max-size 320 \\\n"
               "      --source kvasir=Polyps/Kvasir-SEG/images:Polyps/Kvasir-SEG/masks \\\n"
               "      --source cvc=Polyps/CVC-ClinicDB/images:Polyps/CVC-ClinicDB/masks --groups cvc=cvc-clinicdb\n"
               "group file: JSON {\"group\": [\"id\", \"first-last\" (integer ids), ...], ...}; every case of "
               "the domain\nmust be in exactly one group. Presets: cvc-clinicdb (the 29 video sequences).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", required=True, metavar="NAME=IMAGES_DIR:MASKS_DIR",
                   help="one domain: its name (letters, digits, '-'; the case-id prefix and domain tag), image "
                        "folder and mask folder; repeat for more domains")
    p.add_argument("-d", type=int, required=True, help="dataset id (1-999)")
    p.add_argument("--name", required=True, help="dataset name: the folder is DatasetXXX_NAME")
    p.add_argument("--max-size", type=int, metavar="PIXELS",
                   help="shrink images whose longest side is larger to this (bilinear; masks nearest); the "
                        "original size is recorded in domains.json (default: keep the size)")
    p.add_argument("--threshold", type=int, metavar="T",
                   help="mask value > T is foreground (default: 127, for 0/255 masks; 0 for 0/1 masks)")
    p.add_argument("--label-name", default="foreground", help="name of label 1 in dataset.json (default: foreground)")
    p.add_argument("--groups", action="append", metavar="DOMAIN=PRESET|FILE.json",
                   help="group the cases of a domain (e.g. video sequences) so that splits can hold out whole "
                        "groups; repeat per domain")
    p.add_argument("--licence", default="see the terms of the source datasets",
                   help="licence text for dataset.json (default: 'see the terms of the source datasets')")
    p.add_argument("--force", action="store_true",
                   help="replace a different dataset that has this id (its raw folder is deleted)")
    p.add_argument("--progress-every", type=int, default=100, metavar="N",
                   help="print progress every N cases (default: 100; 0: only the summary)")
    p.set_defaults(func=run)
