"""Image/mask folders of 2D natural images (one folder pair per domain) -> an nnU-Net raw dataset.

What nnU-Net 2.8 expects for RGB images, and what this writes (nnU-Net's ``NaturalImage2DIO`` and its
``Dataset120_RoadSegmentation`` conversion): each case is ONE RGB PNG ``imagesTr/<case>_0000.png`` that the reader
splits into three channels, declared as ``channel_names`` {"0": "R", "1": "G", "2": "B"}; the label is a
single-channel PNG ``labelsTr/<case>.png`` with values 0/1; ``file_ending`` is ".png". JPEG is never written (nnU-Net
refuses lossy formats for its raw data).

Beside ``dataset.json`` goes ``domains.json`` (``DOMAINS_FILE``): the domain of every case, its group (e.g. the video
sequence a colonoscopy frame comes from) where a group rule was given, its source files and original size, and a
record of the conversion request. nnU-Net never reads it; the splits read it only when told to
(``nnunet_foundation.splits.CaseDomains``).

Safety, and why:
- everything is checked before the dataset folder is touched: unpaired files are reported before any image is
  decoded, and the cases are converted into a hidden staging folder that only replaces the target when every case
  converted, so an error never leaves half a dataset;
- reruns are idempotent: the request and a content digest of every input file are recorded, and the same request
  on the same files (moved or copied folders included) changes nothing;
- a different dataset already at that id (other inputs, options, or files added by hand) is refused unless
  ``force``: silently mixing two conversions would mix two datasets.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

DOMAINS_FILE = "domains.json"
DOMAINS_FORMAT = "nnunet-foundation domains v1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_THRESHOLD = 127
#: a mask may have a few intermediate grey values on its edges (JPEG masks, anti-aliasing); more than this fraction
#: of pixels strictly between 10% and 90% grey means the file is not a binary mask (e.g. a photo in the mask folder)
MAX_INTERMEDIATE_FRACTION = 0.05

#: Named group rules. CVC-ClinicDB: frame ids 1-612 fall into 29 video sequences (Bernal et al. 2015; the ranges of
#: the dataset's README). Frames of one sequence show the same polyp, so held-out cases must be whole sequences.
GROUP_PRESETS: Dict[str, Dict[str, List[str]]] = {
    "cvc-clinicdb": {f"seq{i + 1:02d}": [r] for i, r in enumerate(
        "1-25 26-50 51-67 68-78 79-103 104-126 127-151 152-177 178-199 200-205 206-227 228-252 253-277 278-297 "
        "298-317 318-342 343-363 364-383 384-408 409-428 429-447 448-466 467-478 479-503 504-528 529-546 547-571 "
        "572-591 592-612".split())},
}

_SAFE_DOMAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


class ConversionError(ValueError):
    """The conversion cannot go on; the message names the file or option and the fix. Nothing was written."""


@dataclass(frozen=True)
class Source:
    """One domain: its tag and its image and mask folders."""
    domain: str
    images: Path
    masks: Path


@dataclass(frozen=True)
class Pair:
    domain: str
    source_id: str  # the shared file stem
    case: str  # nnU-Net case identifier: <domain>_<safe stem>
    image: Path
    mask: Path


def parse_source(text: str) -> Source:
    """``NAME=IMAGES_DIR:MASKS_DIR`` -> Source (NAME becomes the domain tag and the case-id prefix)."""
    name, sep, dirs = text.partition("=")
    parts = dirs.split(":")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConversionError(f"--source {text!r}: expected NAME=IMAGES_DIR:MASKS_DIR (folder paths without ':')")
    if not _SAFE_DOMAIN.match(name):
        raise ConversionError(f"--source {text!r}: the domain name {name!r} must be letters, digits and '-' (it "
                              f"prefixes every case id)")
    source = Source(name, Path(parts[0]).expanduser().resolve(), Path(parts[1]).expanduser().resolve())
    for folder in (source.images, source.masks):
        if not folder.is_dir():
            raise ConversionError(f"--source {name}: {folder} is not a folder")
    return source


def parse_group_rule(text: str) -> Tuple[str, str, Dict[str, List[str]]]:
    """``DOMAIN=PRESET`` or ``DOMAIN=FILE.json`` -> (domain, rule name, {group: [id or 'first-last' range]})."""
    domain, sep, rule = text.partition("=")
    if not sep or not rule:
        raise ConversionError(f"--groups {text!r}: expected DOMAIN=PRESET or DOMAIN=FILE.json "
                              f"(presets: {', '.join(GROUP_PRESETS)})")
    if rule in GROUP_PRESETS:
        return domain, rule, GROUP_PRESETS[rule]
    try:
        with open(rule) as f:
            groups = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--groups {text!r}: {rule} is neither a preset ({', '.join(GROUP_PRESETS)}) nor a "
                              f"readable JSON file: {e}") from None
    if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
        raise ConversionError(f"--groups {text!r}: {rule} must hold a JSON object {{group: [source id or "
                              f"'first-last' numeric range, ...]}}")
    return domain, os.path.abspath(rule), {str(k): [str(x) for x in v] for k, v in groups.items()}


def assign_groups(source_ids: Sequence[str], groups: Dict[str, List[str]], where: str) -> Dict[str, str]:
    """source id -> group. Items are exact ids or inclusive 'first-last' ranges of integer ids. Every id must fall
    into exactly one group: a frame outside every sequence would be held out on its own, next to its neighbours."""
    assignment: Dict[str, List[str]] = {}
    for sid in source_ids:
        number = int(sid) if sid.isdigit() else None
        for group, items in groups.items():
            for item in items:
                first, dash, last = item.partition("-")
                in_range = dash and first.isdigit() and last.isdigit() and number is not None and \
                    int(first) <= number <= int(last)
                if in_range or item == sid:
                    assignment.setdefault(sid, []).append(group)
                    break
    unassigned = [s for s in source_ids if s not in assignment]
    ambiguous = {s: g for s, g in assignment.items() if len(g) > 1}
    if unassigned:
        raise ConversionError(f"{where}: {len(unassigned)} case(s) are in no group, e.g. {unassigned[:5]}; every "
                              f"case needs one group")
    if ambiguous:
        raise ConversionError(f"{where}: case(s) in more than one group: {dict(list(ambiguous.items())[:5])}")
    return {s: g[0] for s, g in assignment.items()}


def _image_files(folder: Path, what: str) -> Dict[str, Path]:
    """stem -> file for the image files of a folder (hidden files and other extensions are not cases)."""
    files: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise ConversionError(f"two {what} files for one case: {files[path.stem]} and {path}")
        files[path.stem] = path
    return files


def pair_files(sources: Sequence[Source]) -> List[Pair]:
    """Every image with its mask (same stem), before anything is decoded; unpaired files are all named at once."""
    pairs: List[Pair] = []
    problems: List[str] = []
    for source in sources:
        images = _image_files(source.images, "image")
        masks = _image_files(source.masks, "mask")
        if not images:
            problems.append(f"{source.domain}: no image files ({', '.join(IMAGE_SUFFIXES)}) in {source.images}")
        for stem in sorted(set(images) - set(masks)):
            problems.append(f"image without mask: {images[stem]} (no {source.masks}/{stem}.*)")
        for stem in sorted(set(masks) - set(images)):
            problems.append(f"mask without image: {masks[stem]} (no {source.images}/{stem}.*)")
        for stem in sorted(set(images) & set(masks)):
            case = f"{source.domain}_{re.sub(r'[^A-Za-z0-9_-]+', '-', stem)}"
            pairs.append(Pair(source.domain, stem, case, images[stem], masks[stem]))
    seen: Dict[str, Pair] = {}
    for pair in pairs:
        if pair.case in seen:
            problems.append(f"case id {pair.case} twice: {seen[pair.case].image} and {pair.image} (file names differ "
                            f"only in characters that are not safe in a case id)")
        seen[pair.case] = pair
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{len(problems)} problem(s) before conversion, nothing written:\n  " +
                              "\n  ".join(shown))
    return pairs


def _open(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, naming the file, not later inside nnU-Net
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConversionError(f"unreadable {what} {path}: {e}") from None
    return image


def binary_mask(mask_image, path: Path, threshold: int) -> np.ndarray:
    """Grey mask -> uint8 0/1 (> threshold is foreground), refusing files that are not binary-ish masks."""
    grey = np.asarray(mask_image.convert("L"))
    top = int(grey.max())
    if 0 < top <= threshold:
        raise ConversionError(f"mask {path}: every value is at most {top}, at or below the threshold {threshold}, "
                              f"so it would become empty. Is it a 0/1 or multi-label map? Then use --threshold 0 "
                              f"(binary 0/1 masks only).")
    intermediate = float(np.mean((grey > 25) & (grey < 230))) if top > 1 else 0.0
    if intermediate > MAX_INTERMEDIATE_FRACTION:
        raise ConversionError(f"mask {path}: {intermediate:.0%} of its pixels are grey (neither near 0 nor near "
                              f"255): not a binary mask (at most {MAX_INTERMEDIATE_FRACTION:.0%} edge pixels may be). "
                              f"Is it an image in the mask folder?")
    return (grey > threshold).astype(np.uint8)


def convert_pair(pair: Pair, max_size: Optional[int], threshold: int):
    """(RGB image, 0/1 mask, original (w, h), written (w, h)); the longest side is shrunk to ``max_size``."""
    from PIL import Image

    image = _open(pair.image, "image")
    mask = _open(pair.mask, "mask")
    if image.size != mask.size:
        raise ConversionError(f"mask {pair.mask} is {mask.size[0]}x{mask.size[1]} but its image {pair.image} is "
                              f"{image.size[0]}x{image.size[1]} (width x height)")
    label = binary_mask(mask, pair.mask, threshold)
    rgb = image.convert("RGB")  # grey, palette and RGBA images all become the 3 channels dataset.json declares
    original = rgb.size
    size = original
    if max_size and max(original) > max_size:
        scale = max_size / max(original)
        size = (max(1, round(original[0] * scale)), max(1, round(original[1] * scale)))
        # bilinear (antialiased by PIL when shrinking) for colours; nearest keeps the label exactly 0/1
        rgb = rgb.resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return rgb, label, original, size


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def conversion_request(pairs: Sequence[Pair], sources: Sequence[Source], groups: Dict[str, Tuple[str, dict]],
                       dataset_name: str, max_size: Optional[int], threshold: int, label_name: str) -> dict:
    """What determines the output: options, group rules and the content of every input file (not paths or mtimes,
    so a moved or copied data folder is still the same dataset)."""
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: p.case):
        digest.update(f"{pair.case}:{_sha1(pair.image)}:{_sha1(pair.mask)}\n".encode())
    return {"dataset": dataset_name, "domains": [s.domain for s in sources], "max_size": max_size,
            "threshold": threshold, "label_name": label_name,
            "groups": {d: {"rule": os.path.basename(rule) if os.path.isabs(rule) else rule, "groups": g}
                       for d, (rule, g) in sorted(groups.items())},
            "num_cases": len(pairs), "inputs_sha256": digest.hexdigest()}


def _expected_files(cases: Sequence[str]) -> Dict[str, set]:
    return {"imagesTr": {f"{c}_0000.png" for c in cases}, "labelsTr": {f"{c}.png" for c in cases}}


def existing_state(folder: Path, request: dict, cases: Sequence[str]) -> str:
    """'missing', 'same' (this request converted completely, nothing else in it) or 'different'."""
    if not folder.exists():
        return "missing"
    record = folder / DOMAINS_FILE
    try:
        recorded = json.loads(record.read_text())["conversion"]["request"]
    except (OSError, ValueError, KeyError, TypeError):
        return "different"
    if recorded != request or not (folder / "dataset.json").is_file():
        return "different"
    for sub, names in _expected_files(cases).items():
        present = {p.name for p in (folder / sub).iterdir()} if (folder / sub).is_dir() else set()
        if present != names:
            return "different"  # a file missing or added by hand: not the dataset the record describes
    return "same"


def _dataset_folders(raw_root: Path, dataset_id: int) -> List[Path]:
    return sorted(p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())


def convert_2d(sources: Sequence[Source], raw_root: str, dataset_id: int, name: str,
               max_size: Optional[int] = None, threshold: int = DEFAULT_THRESHOLD, label_name: str = "foreground",
               group_rules: Sequence[str] = (), licence: str = "see the terms of the source datasets",
               force: bool = False, progress_every: int = 100,
               log: Callable[[str], None] = print) -> dict:
    """Convert; returns {'folder', 'status' ('written', 'replaced' or 'up to date'), 'num_cases', 'per_domain',
    'seconds'}. Raises ConversionError (nothing written) on any problem."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from PIL import Image

    t0 = time.time()
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"-d {dataset_id}: nnU-Net dataset ids are 1 to 999")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", name):
        raise ConversionError(f"--name {name!r}: letters, digits, '_' and '-' only (it is part of a folder name)")
    if max_size is not None and max_size < 8:
        raise ConversionError(f"--max-size {max_size}: too small for a segmentation network (at least 8)")
    if not 0 <= threshold < 255:
        raise ConversionError(f"--threshold {threshold}: must be 0 to 254 (mask value > threshold is foreground)")
    if not sources:
        raise ConversionError("give at least one --source NAME=IMAGES_DIR:MASKS_DIR")
    domains = [s.domain for s in sources]
    if len(set(domains)) != len(domains):
        raise ConversionError(f"--source: each domain name once, got {domains}")
    groups: Dict[str, Tuple[str, dict]] = {}
    for text in group_rules:
        domain, rule, definition = parse_group_rule(text)
        if domain not in domains:
            raise ConversionError(f"--groups {text!r}: no --source named {domain!r} (domains: {', '.join(domains)})")
        groups[domain] = (rule, definition)

    pairs = pair_files(sources)
    group_of: Dict[str, Optional[str]] = {p.case: None for p in pairs}
    for domain, (rule, definition) in groups.items():
        ids = [p.source_id for p in pairs if p.domain == domain]
        assigned = assign_groups(ids, definition, f"--groups {domain}={rule}")
        group_of.update({p.case: assigned[p.source_id] for p in pairs if p.domain == domain})

    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    raw = Path(raw_root)
    folder = raw / dataset_name
    request = conversion_request(pairs, sources, groups, dataset_name, max_size, threshold, label_name)
    request["licence"] = licence
    cases = [p.case for p in pairs]
    per_domain = {d: sum(p.domain == d for p in pairs) for d in domains}
    state = existing_state(folder, request, cases)
    others = [p for p in _dataset_folders(raw, dataset_id) if p != folder]
    if state == "same" and not others:
        log(f"{folder} is up to date ({len(pairs)} cases from the same files and options): nothing written")
        return {"folder": str(folder), "status": "up to date", "num_cases": len(pairs), "per_domain": per_domain,
                "seconds": time.time() - t0}
    occupied = ([folder] if state == "different" else []) + others
    if occupied and not force:
        raise ConversionError(
            f"dataset id {dataset_id} is taken by {', '.join(map(str, occupied))}, with other files or options than "
            f"this conversion (nothing was changed). Choose another -d, or add --force to replace it.")

    staging = raw / f".{dataset_name}.converting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "imagesTr").mkdir(parents=True)
        (staging / "labelsTr").mkdir()
        records = {}
        for k, pair in enumerate(pairs, 1):
            rgb, label, original, size = convert_pair(pair, max_size, threshold)
            rgb.save(staging / "imagesTr" / f"{pair.case}_0000.png")
            Image.fromarray(label).save(staging / "labelsTr" / f"{pair.case}.png")
            records[pair.case] = {"domain": pair.domain, "group": group_of[pair.case], "source_id": pair.source_id,
                                  "image": str(pair.image), "mask": str(pair.mask),
                                  "original_width": original[0], "original_height": original[1],
                                  "width": size[0], "height": size[1], "foreground_pixels": int(label.sum())}
            if progress_every and (k % progress_every == 0 or k == len(pairs)):
                log(f"converted {k}/{len(pairs)} cases ({time.time() - t0:.0f} s)")
        generate_dataset_json(str(staging), {0: "R", 1: "G", 2: "B"}, {"background": 0, label_name: 1},
                              len(pairs), ".png", dataset_name=dataset_name,
                              description=f"2D RGB images with binary masks from {', '.join(domains)}, converted "
                                          f"by nnunet-foundation convert-2d; per-case domains in {DOMAINS_FILE}",
                              overwrite_image_reader_writer="NaturalImage2DIO", license=licence,
                              converted_by="nnunet-foundation convert-2d")
        side = {"format": DOMAINS_FORMAT,
                "domain": {c: r["domain"] for c, r in sorted(records.items())},
                "group": {c: r["group"] for c, r in sorted(records.items())},
                "domains": {s.domain: {"images": str(s.images), "masks": str(s.masks), "num_cases": per_domain[s.domain],
                                       "group_rule": groups[s.domain][0] if s.domain in groups else None,
                                       "groups": _group_sizes(records, s.domain)} for s in sources},
                "cases": dict(sorted(records.items())),
                "conversion": {"request": request, "max_size": max_size, "threshold": threshold}}
        (staging / DOMAINS_FILE).write_text(json.dumps(side, indent=2))
        for old in occupied:
            shutil.rmtree(old)  # only with force (checked above): replaced as a whole, never mixed
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    status = "replaced" if occupied else "written"
    log(f"{status} {folder}: {len(pairs)} cases (" + ", ".join(f"{d} {n}" for d, n in per_domain.items()) +
        f") in {time.time() - t0:.0f} s")
    return {"folder": str(folder), "status": status, "num_cases": len(pairs), "per_domain": per_domain,
            "replaced": [str(p) for p in occupied], "seconds": time.time() - t0}


def _group_sizes(records: dict, domain: str) -> Optional[Dict[str, int]]:
    sizes: Dict[str, int] = {}
    for r in records.values():
        if r["domain"] == domain and r["group"] is not None:
            sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    return dict(sorted(sizes.items())) or None
