"""Aggregates, ``results.json``, ``report.md`` and the plots of a benchmark.

Every number in ``report.md`` is read from the ``results.json`` structure built here, and every aggregate in it is
computed from the per-case numbers that ``results.json`` also holds, so the three never disagree.

Aggregation (per trainer and column; a column is a labeled count, or ``all`` for the fully supervised runs):
the per-case foreground mean (mean over classes of one test case) is pooled over seeds; tables show its mean ± the
standard deviation over test cases; ``std_over_seeds`` is the spread of the per-seed means (NaN with one seed).
"""
from __future__ import annotations

import json
import math
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_foundation.benchmark.settings import COTRAINED_SAM, GENERALIST, LOWER, SSL, UPPER, exported_model
from nnunet_foundation.evaluation import METRICS, distance_unit, gap_closed, mean_std, write_json

#: decimals per metric in report.md
DECIMALS = {"Dice": 3, "NSD": 3, "HD95": 2}
ROLE_ORDER = {LOWER: 0, GENERALIST: 1, SSL: 1, COTRAINED_SAM: 1, UPPER: 2}
#: how the rows of --cached-trainers are labelled
CACHED_LABEL = "semi-supervised, generalist labels prompted by the labeled-only model"
GENERALIST_LABEL = "the generalist alone, prompted by the labeled-only model (predict-generalist)"
COTRAINED_SAM_LABEL = "its co-trained SAM (predict-sam-student; SC-SAM's prompted by the run's nnU-Net)"
PRESTAGE_LABEL = "semi-supervised, with its per-fold pre-stage (SFR: fine-tuned generalist; IFL: its rounds)"


def _column_sort_key(column: str):
    return (1, 0) if column == "all" else (0, int(column))


def aggregate(results: List[dict]) -> dict:
    """{trainer: {column: {...}}} over runs (seeds) and test cases; see the module doc."""
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in results:
        run = r["run"]
        column = "all" if run["num_labeled"] is None else str(run["num_labeled"])
        groups[(run["trainer"], column)].append(r)
    out: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for (trainer, column), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], _column_sort_key(kv[0][1]))):
        runs = sorted(runs, key=lambda r: r["run"]["seed"])
        classes = runs[0]["evaluation"]["classes"]
        entry = {"role": runs[0]["run"]["role"], "method": runs[0]["run"]["method"],
                 "pseudo_labels": bool(runs[0]["run"].get("pseudo_labels")),
                 "prestage": bool(runs[0]["run"].get("prestage")),
                 "num_labeled": runs[0]["run"]["num_labeled"],
                 "num_train": sorted({r["run"]["num_train"] for r in runs}),
                 "seeds": [r["run"]["seed"] for r in runs], "runs": [r["run"]["run_id"] for r in runs],
                 "foreground_mean": {}, "per_class": {}}
        for m in METRICS:
            cases = [c["foreground_mean"][m] for r in runs for c in r["evaluation"]["per_case"]]
            over_cases = mean_std(cases)
            over_seeds = mean_std(r["evaluation"]["foreground_mean"][m]["mean"] for r in runs)
            entry["foreground_mean"][m] = {"mean": over_cases["mean"], "std_over_cases": over_cases["std"],
                                           "n_cases": over_cases["n"], "std_over_seeds": over_seeds["std"],
                                           "n_seeds": over_seeds["n"]}
        for key, name in classes.items():
            entry["per_class"][key] = {"name": name}
            for m in METRICS:
                stats = mean_std(c["metrics"][key][m] for r in runs for c in r["evaluation"]["per_case"])
                entry["per_class"][key][m] = {"mean": stats["mean"], "std_over_cases": stats["std"]}
            entry["per_class"][key]["volume_ratio"] = volume_ratio(
                c["metrics"][key] for r in runs for c in r["evaluation"]["per_case"])
        out[trainer][column] = entry
    return dict(out)


def volume_ratio(case_metrics) -> dict:
    """Median over cases of predicted / reference voxels of one class, over the cases that have the structure: 1 is
    the right size, above 1 over-segments. Dice hides the direction of an error; a method that learns from its own
    pseudo-labels drifts in volume first (a confidence rule that admits more of one class than of another)."""
    ratios = [m["n_pred"] / m["n_ref"] for m in case_metrics if m.get("n_ref")]
    return {"median": float(np.median(ratios)) if ratios else math.nan, "n_cases": len(ratios)}


def gaps(results: List[dict]) -> dict:
    """Fraction of the gap closed per SSL trainer, labeled count and seed: (ssl − lower) / (upper − lower) on the
    run's mean over test cases; lower = labeled-only run of the same fold, upper = fully supervised run of the seed."""
    by_key = {}
    for r in results:
        run = r["run"]
        by_key[(run["role"], run["trainer"], run["num_labeled"], run["seed"])] = r
    lower = {(k[2], k[3]): v for k, v in by_key.items() if k[0] == LOWER}
    upper = {k[3]: v for k, v in by_key.items() if k[0] == UPPER}
    out: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for (role, trainer, n, seed), r in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2] or 0, kv[0][3])):
        if role not in (SSL, GENERALIST, COTRAINED_SAM) or (n, seed) not in lower or seed not in upper:
            continue
        column = out[trainer].setdefault(str(n), {m: {"per_seed": {}} for m in METRICS})
        for m in METRICS:
            value = gap_closed(r["evaluation"]["foreground_mean"][m]["mean"],
                               lower[(n, seed)]["evaluation"]["foreground_mean"][m]["mean"],
                               upper[seed]["evaluation"]["foreground_mean"][m]["mean"])
            column[m]["per_seed"][str(seed)] = value
    for trainer in out.values():
        for column in trainer.values():
            for m in METRICS:
                column[m].update(mean_std(column[m]["per_seed"].values()))
    return dict(out)


def students(results: List[dict], exported: Dict[str, str]) -> List[dict]:
    """Runs scored twice - the exported model and the trained network (``student_evaluation``, the benchmark's
    ``checkpoint_student.pth`` prediction) - grouped by trainer, role and labeled count, mean Dice over test cases
    pooled over seeds."""
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in results:
        if r.get("student_evaluation"):
            run = r["run"]
            groups[(run["trainer"], run["role"], run["num_labeled"])].append(r)
    rows = []
    for (trainer, role, n), runs in sorted(groups.items(), key=lambda kv: (ROLE_ORDER[kv[0][1]], kv[0][0],
                                                                         kv[0][2] or 10 ** 9)):
        def pooled(key):
            return mean_std(c["foreground_mean"]["Dice"] for r in runs for c in r[key]["per_case"])["mean"]

        rows.append({"trainer": trainer, "role": role, "labeled": "all" if n is None else str(n),
                     "exported_model": exported.get(trainer, "exported"), "seeds": [r["run"]["seed"] for r in runs],
                     "exported_dice": pooled("evaluation"), "student_dice": pooled("student_evaluation")})
    return rows


def restrict_to_cases(results: List[dict], cases) -> List[dict]:
    """The results with only these test cases, their aggregates recomputed from the per-case numbers."""
    from nnunet_foundation.evaluation import summarise

    keep = set(cases)
    restricted = []
    for r in results:
        per_case = [c for c in r["evaluation"]["per_case"] if c["case"] in keep]
        evaluation = {**r["evaluation"], "per_case": per_case, **summarise(per_case, r["evaluation"]["classes"])}
        restricted.append({**r, "evaluation": evaluation})
    return restricted


def by_test_domain(results: List[dict], test_domains: Dict[str, str], test_groups: Dict[str, str],
                   labeled_domains) -> dict:
    """Aggregates and gap closed per domain of the test cases; empty when the test set has one domain only."""
    names = sorted(set(test_domains.values()))
    if len(names) < 2:
        return {}
    out = {}
    for name in names:
        cases = sorted(c for c, d in test_domains.items() if d == name)
        subset = restrict_to_cases(results, cases)
        setting = None
        if labeled_domains:
            setting = "in-domain" if name in labeled_domains else "cross-domain"
        groups = {test_groups[c] for c in cases if test_groups.get(c) is not None}
        out[name] = {"setting": setting, "num_test_cases": len(cases), "num_test_groups": len(groups),
                     "test_cases": cases, "aggregates": aggregate(subset), "gap_closed": gaps(subset)}
    return out


def trained_settings(result: dict, defaults: Dict[str, dict]) -> Optional[dict]:
    """The semi-supervised settings a training ran with (``ssl_settings.json`` in its folder, as the trainer wrote it)
    and those of them that differ from its trainer class's defaults (``defaults``: class name -> default_settings).
    Settings come from ``nnUNet_ssl_*`` variables or a config file, which no run id shows: without this a row of a
    re-weighted CPS reads as CPS. None for rows that train nothing and trainings that record no settings (nnU-Net's
    own trainers)."""
    from nnunet_foundation.training.settings import SETTINGS_FILE, comparable_settings

    run = result["run"]
    record = Path(result.get("training_folder", "")) / SETTINGS_FILE
    if run["role"] not in (LOWER, SSL, UPPER) or not record.is_file():
        return None
    recorded = json.loads(record.read_text()).get("settings", {})
    default = comparable_settings(defaults.get(run["trainer"], {}))
    comparable = comparable_settings(recorded)
    changed = {name: {"value": value, "default": default.get(name)} for name, value in sorted(comparable.items())
               if name not in default or json.dumps(value, sort_keys=True) != json.dumps(default[name], sort_keys=True)}
    return {"recorded": recorded, "changed": changed}


def settings_by_trainer(results: List[dict]) -> Dict[str, Dict[str, dict]]:
    """{trainer: {run_id: changed settings}} over the runs that record settings."""
    out: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for r in results:
        if r.get("settings") is not None:
            out[r["run"]["trainer"]][r["run"]["run_id"]] = r["settings"]["changed"]
    return dict(out)


def _settings_lines(data: dict) -> List[str]:
    """The report's account of non-default settings: one line per trainer whose runs changed any, and a warning
    where the runs pooled into one row trained with different settings (the row would mix two configurations)."""
    def describe(changed: dict) -> str:
        return ", ".join(f"{name} {json.dumps(v['value'])} (default {json.dumps(v['default'])})"
                         for name, v in changed.items()) or "the defaults"

    per_trainer = data.get("settings_changed", {})
    if not per_trainer:
        return []
    # the distinct configurations among each row's runs: one = the row is one configuration
    configurations = {t: {json.dumps(c, sort_keys=True) for c in runs.values()} for t, runs in per_trainer.items()}
    changed_rows = {t: runs for t, runs in per_trainer.items() if any(runs.values())}
    if not changed_rows:
        return ["- **Settings**: every training ran with its trainer's default settings (`ssl_settings.json`)."]

    def row(trainer: str, runs: dict) -> str:
        if len(configurations[trainer]) == 1:
            return f"`{trainer}`: {describe(next(iter(runs.values())))}"
        return f"`{trainer}`: " + ", ".join(f"{run_id}: {describe(c)}" for run_id, c in sorted(runs.items()))

    lines = ["- **Settings changed from the trainer's defaults** (`nnUNet_ssl_*` / `nnUNet_ssl_config`, as each "
             "training's `ssl_settings.json` recorded them; other trainers ran with their defaults): "
             + "; ".join(row(t, runs) for t, runs in sorted(changed_rows.items())) + "."]
    mixed = [t for t in per_trainer if len(configurations[t]) > 1]
    if mixed:
        lines.append("- **Settings differ between the runs of one row** (" + ", ".join(f"`{t}`" for t in mixed)
                     + "): its cells pool two configurations; rerun those runs with one setting.")
    return lines


def build_results(bench, results: List[dict], missing: List, command: Optional[str], cost: Optional[dict]) -> dict:
    from nnunet_foundation.benchmark.machine import machine_info
    from nnunet_foundation.training.settings import package_trainer_classes

    s = bench.settings
    domains = getattr(bench, "case_domains", None)
    test_domains = {c: domains.domain[c] for c in bench.test_cases} if domains else None
    test_groups = {c: domains.group[c] for c in bench.test_cases} if domains else {}
    # what each trainer's network_weights hold: the model nnUNetv2_predict scored
    exported = {s.trainer_class(t): exported_model(t) for t in (s.baseline_trainer, *s.trainers, *s.cached_trainers)}
    defaults = {cls.__name__: cls.default_settings for cls in package_trainer_classes()}
    machines = []
    for r in results:
        r["settings"] = trained_settings(r, defaults)
        if r.get("machine") and r["machine"] not in machines:
            machines.append(r["machine"])
    return {
        "dataset": bench.dataset_name,
        "configuration": s.configuration,
        "plans": s.plans,
        "budget": {"name": s.budget, "description": bench.budget.description,
                   "num_epochs": bench.budget.num_epochs, "iterations_per_epoch": bench.budget.iterations_per_epoch,
                   "total_iterations": bench.budget.total_iterations, "batch_size": bench.budget.batch_size},
        "seeds": list(s.seeds),
        "labeled": list(s.labeled),
        "trainers": {"lower_bound": s.trainer_class(s.baseline_trainer),
                     "semi_supervised": [s.trainer_class(t) for t in s.trainers],
                     "cached": [s.trainer_class(t) for t in s.cached_trainers],
                     "upper_bound": s.trainer_class(s.baseline_trainer),
                     "exported_model": exported},
        "num_val": s.num_val,
        "test_cases": bench.test_cases,
        "folds": [{"fold": i.fold, "seed": i.seed, "num_labeled": i.num_labeled, **{k: f[k] for k in f}}
                  for f, i in zip(bench.folds, bench.fold_infos)],
        "num_unlabeled_extra": bench.extra_unlabeled_cases(),
        "metrics": {"foreground_mean": "per test case, the mean over foreground classes; then mean and std over "
                                       "test cases pooled over seeds (std_over_cases) and std of per-seed means "
                                       "(std_over_seeds)",
                    "HD95": "max of the two directed 95th percentiles of surface distances, in distance_unit",
                    "NSD": "normalised surface distance (surface Dice) at the tolerance below",
                    "tolerance_mm": results[0]["evaluation"]["tolerance_mm"] if results else None,
                    "distance_unit": distance_unit(bench.dataset_json),
                    "empty_masks": "both empty: Dice 1, HD95 0, NSD 1; one empty: Dice 0, HD95 = image diagonal, "
                                   "NSD 0"},
        "machine": {"report": machine_info(s.device), "runs": machines},
        "command": command,
        "canonical_command": s.command(str(bench.output)),
        "runs": results,
        "students": students(results, exported),
        "settings_changed": settings_by_trainer(results),
        "missing_runs": [r.run_id for r in missing],
        "aggregates": aggregate(results),
        "gap_closed": gaps(results),
        "labeled_domains": list(s.labeled_domains),
        "test_domains": test_domains,
        "by_test_domain": by_test_domain(results, test_domains or {}, test_groups, s.labeled_domains),
        "cost": cost,
    }


# ---------------------------------------------------------------------------------------------------- markdown
def fmt(stats: dict, metric: str, std_key: str = "std_over_cases") -> str:
    mean, std = stats.get("mean", math.nan), stats.get(std_key, math.nan)
    if mean is None or math.isnan(mean):
        return "–"
    d = DECIMALS.get(metric, 3)
    return f"{mean:.{d}f}" + ("" if std is None or math.isnan(std) else f" ± {std:.{d}f}")


def _rows_in_order(aggregates: dict) -> List[str]:
    def key(trainer):
        roles = {e["role"] for e in aggregates[trainer].values()}
        return (0 if LOWER in roles or UPPER in roles else 1, trainer)
    return sorted(aggregates, key=key)


def bound_seeds(aggregates: dict) -> Dict[str, List[int]]:
    """{column: the seeds of the bound in that column} (the labeled-only row; 'all': the fully supervised row)."""
    out = {}
    for entries in aggregates.values():
        for column, entry in entries.items():
            if entry["role"] in (LOWER, UPPER):
                out[column] = sorted(entry["seeds"])
    return out


def seeds_note(entry: dict, column: str, bounds: Dict[str, List[int]]) -> str:
    """' (seed 1)' where a cell pools other seeds than its column's bound - a pooled mean over other seeds than the
    bound's is not comparable with it (each seed has its own labeled cases) - else ''."""
    seeds = sorted(entry["seeds"])
    if column not in bounds or seeds == bounds[column]:
        return ""
    return f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"


def _metric_table(data: dict, metric: str, std_key: str, columns: List[str], upper_label: str) -> List[str]:
    aggregates = data["aggregates"]
    bounds = bound_seeds(aggregates)
    header = [f"{c} labeled" for c in columns if c != "all"] + ([upper_label] if "all" in columns else [])
    lines = ["| trainer | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for trainer in _rows_in_order(aggregates):
        label = trainer
        entries = aggregates[trainer]
        if any(e["role"] == LOWER for e in entries.values()):
            label = f"{trainer} (labeled only / all labels)"
        elif any(e.get("prestage") for e in entries.values()):
            label = f"{trainer} ({PRESTAGE_LABEL})"
        elif any(e.get("pseudo_labels") for e in entries.values()):
            label = f"{trainer} ({CACHED_LABEL})"
        elif any(e["role"] == GENERALIST for e in entries.values()):
            label = GENERALIST_LABEL
        elif any(e["role"] == COTRAINED_SAM for e in entries.values()):
            label = f"{trainer} ({COTRAINED_SAM_LABEL})"
        if any(data.get("settings_changed", {}).get(trainer, {}).values()):
            label += " (non-default settings, above)"
        cells = [fmt(entries[c]["foreground_mean"][metric], metric, std_key) + seeds_note(entries[c], c, bounds)
                 if c in entries else "" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(data: dict, plots: List[str]) -> str:
    aggregates = data["aggregates"]
    columns = sorted({c for t in aggregates.values() for c in t}, key=_column_sort_key)
    full = next((e for t in aggregates.values() for c, e in t.items() if c == "all"), None)
    upper_label = f"all labeled ({', '.join(map(str, full['num_train']))})" if full else "all labeled"
    b = data["budget"]
    m = data["machine"]["report"]
    from nnunet_foundation.benchmark.machine import describe

    tolerance = data["metrics"]["tolerance_mm"] or {}
    unit = _distance_unit(data)
    pixels = " - pixels: the images carry no spacing" if unit == "px" else ""
    lines = [f"# Label-scarcity benchmark: {data['dataset']}, {data['configuration']}", "",
             f"- **Budget** `{b['name']}`: {b['description']} — {b['total_iterations']} iterations, the same for "
             f"every run.",
             f"- **Trainers**: `{data['trainers']['lower_bound']}` on the labeled cases only (lower bound), "
             # the cached rows too (a report of SFR's rows alone listed no semi-supervised trainer at all)
             + ", ".join([f"`{t}`" for t in data["trainers"]["semi_supervised"]]
                         + [f"`{t}` (offline generalist labels)" for t in data["trainers"].get("cached", [])])
             + " with the same labeled cases plus the fold's unlabeled ones"
             + (f" and {data['num_unlabeled_extra']} imagesUnlabeled scans" if data["num_unlabeled_extra"] else "")
             + f", and `{data['trainers']['upper_bound']}` with every non-test, non-validation case labeled (upper "
               f"bound).",
             "- **Exported model** (what `nnUNetv2_predict` scored): "
             + "; ".join(f"`{t}`: {m}" for t, m in data["trainers"].get("exported_model", {}).items()) + ".",
             *_settings_lines(data),
             f"- **Seeds**: {', '.join(map(str, data['seeds']))} (one split per seed: validation cases and nested "
             f"labeled sets); {data['num_val']} validation cases per seed"
             + (f", labeled and validation cases from {', '.join(data['labeled_domains'])} only"
                if data.get("labeled_domains") else "") + ".",
             f"- **Test set**: {len(data['test_cases'])} held-out cases"
             + (" (" + ", ".join(f"{d} {e['num_test_cases']}" for d, e in data["by_test_domain"].items()) + ")"
                if data.get("by_test_domain") else "")
             + ", in no training, unlabeled or validation list of any fold (`test_split.json`); all numbers below "
               "are on them.",
             f"- **Machine**: {describe(m)}."
             + (" Runs were trained on: " + "; ".join(describe(x) for x in data["machine"]["runs"]) + "."
                if data["machine"]["runs"] and data["machine"]["runs"] != [m] else ""),
             f"- **Command**: `{data['command'] or data['canonical_command']}`",
             "",
             "Metrics per test case are means over the foreground classes; cells are mean ± std over test cases "
             f"(pooled over seeds). HD95 in {unit} (lower is better){pixels}; NSD at "
             + ", ".join(f"{_class_name(data, k)} {v:g} {unit}" for k, v in tolerance.items())
             + ". Empty masks: both empty → Dice 1, HD95 0, NSD 1; one empty → Dice 0, HD95 = image diagonal, NSD 0.",
             ""]
    bounds = bound_seeds(aggregates)
    if any(seeds_note(e, c, bounds) for t in aggregates.values() for c, e in t.items()):
        lines += ["**Seeds differ between rows**: a cell marked (seed ...) pools only those seeds, while the bounds "
                  "pool " + "; ".join(f"seeds {', '.join(map(str, v))} ({c} labeled)"
                                      for c, v in sorted(bounds.items(), key=lambda kv: _column_sort_key(kv[0]))) +
                  ". Each seed has its own labeled cases, so compare such a cell with the bound only through the "
                  "fraction of the gap closed, which is computed per seed.", ""]
    if data["missing_runs"]:
        lines += [f"**Incomplete**: {len(data['missing_runs'])} run(s) not finished yet and left out: "
                  + ", ".join(f"`{r}`" for r in data["missing_runs"]), ""]
    for metric, title in (("Dice", "Dice"), ("HD95", f"HD95 ({unit})"), ("NSD", "NSD")):
        lines += [f"## {title}", ""] + _metric_table(data, metric, "std_over_cases", columns, upper_label) + [""]
    if len(data["seeds"]) > 1:
        lines += ["## Dice, mean ± std over seeds", "",
                  "The spread of the per-seed means (each seed has its own validation and labeled cases).", ""]
        lines += _metric_table(data, "Dice", "std_over_seeds", columns, upper_label) + [""]
    lines += ["## Fraction of the gap closed", "",
              "(SSL − labeled-only) / (fully supervised − labeled-only), per seed on the mean over test cases, then "
              "mean ± std over seeds: 0 = no better than the labeled cases alone, 1 = as good as labeling every "
              "case, negative = worse than labeled-only.", ""]
    lines += _gap_table(data["gap_closed"]) + [""]
    lines += _per_domain_sections(data, columns, upper_label)
    if data.get("students"):
        lines += ["## Exported model and the trained network", "",
                  "Runs whose checkpoint exports another model than the network they train (an EMA teacher, an EMA "
                  "of the weights) are scored with both: Dice, mean over test cases pooled over seeds.", "",
                  "| trainer | labeled | exported model | Dice exported | Dice trained network | difference |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {row['trainer']}{' (all labels)' if row['role'] == UPPER else ''} | {row['labeled']} | "
                  f"{row['exported_model']} | {row['exported_dice']:.3f} | {row['student_dice']:.3f} | "
                  f"{row['exported_dice'] - row['student_dice']:+.3f} |" for row in data["students"]]
        lines += [""]

    lines += ["## Per class (Dice, mean ± std over test cases)", ""]
    classes = next(iter(next(iter(aggregates.values())).values()))["per_class"] if aggregates else {}
    lines += ["| trainer | labeled | " + " | ".join(f"{v['name']}" for v in classes.values()) + " |",
              "|---|---" + "|---" * len(classes) + "|"]
    for trainer in _rows_in_order(aggregates):
        for column in sorted(aggregates[trainer], key=_column_sort_key):
            entry = aggregates[trainer][column]
            lines.append(f"| {trainer} | {column} | " + " | ".join(
                fmt(entry["per_class"][k]["Dice"], "Dice") for k in classes) + " |")
    lines += [""]

    if any(v.get("volume_ratio", {}).get("n_cases") for column in aggregates.values() for entry in column.values()
           for v in entry["per_class"].values()):
        lines += ["## Predicted / reference volume per class (median over test cases)", "",
                  "Predicted voxels / reference voxels per test case that has the structure: 1 = the right size, "
                  "above 1 = over-segmented, below 1 = under-segmented (Dice does not say which).", "",
                  "| trainer | labeled | " + " | ".join(f"{v['name']}" for v in classes.values()) + " |",
                  "|---|---" + "|---" * len(classes) + "|"]
        for trainer in _rows_in_order(aggregates):
            for column in sorted(aggregates[trainer], key=_column_sort_key):
                per_class = aggregates[trainer][column]["per_class"]
                lines.append(f"| {trainer} | {column} | " + " | ".join(
                    f"{per_class[k]['volume_ratio']['median']:.2f}" for k in classes) + " |")
        lines += [""]

    lines += ["## Training time", "",
              "Seconds per epoch from nnU-Net's own epoch timestamps (includes data loading and validation; "
              "comparable only between runs on the same machine), relative to the labeled-only runs.", "",
              "| trainer | runs | epochs | s/epoch | x labeled-only |", "|---|---|---|---|---|"]
    per_trainer = defaultdict(list)
    for r in data["runs"]:
        if r["training"].get("epochs"):
            per_trainer[(r["run"]["trainer"], r["run"]["role"] == UPPER)].append(r["training"])
    base = [t["seconds_per_epoch"] for (name, is_upper), ts in per_trainer.items() if not is_upper
            for t in ts if name == data["trainers"]["lower_bound"]]
    base_mean = float(np.mean(base)) if base else math.nan
    order = {t: i for i, t in enumerate([data["trainers"]["lower_bound"]] + data["trainers"]["semi_supervised"])}
    for (trainer, is_upper), ts in sorted(per_trainer.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        spe = float(np.mean([t["seconds_per_epoch"] for t in ts]))
        label = f"{trainer} (all labels)" if is_upper else trainer
        lines.append(f"| {label} | {len(ts)} | {ts[0]['epochs']} | {spe:.1f} | {spe / base_mean:.2f} |")
    lines += [""]
    if data.get("cost"):
        lines += ["## Cost per iteration (benchmarks/trainer_cost.py)", "", data["cost"].get("header", ""), ""]
        lines += _cost_table(data["cost"]) + [""]

    cores = data["machine"]["report"].get("cpu_cores")
    lines += ["## Runs", "",
              "*cores busy*: the training's CPU seconds (all its processes) per wall-clock second"
              + (f" ({cores} cores on this machine)" if cores else "") + ". A run with the machine to itself keeps "
              "about as many cores busy as it has threads and workers; far fewer means it waited - for other work on "
              "the machine, a pause, or the GPU - and its times are upper bounds.", "",
              "| run | fold | role | labeled | unlabeled | val | Dice | HD95 | NSD | epochs | train s | cores busy "
              "| generalist s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["runs"], key=lambda r: (r["run"]["seed"], r["run"]["fold"], ROLE_ORDER[r["run"]["role"]])):
        run, fg = r["run"], r["evaluation"]["foreground_mean"]
        unlabeled = run["num_unlabeled_from_split"] + r.get("num_unlabeled_extra", 0) if run["role"] == SSL else 0
        train_s = r["training"].get("seconds")
        timings = r.get("timings", {})
        busy = timings["train_cpu_s"] / timings["train_wall_s"] \
            if timings.get("train_cpu_s") is not None and timings.get("train_wall_s") else None
        # the offline generalist's wall time (--cached-trainers: pseudo-labelling the fold's unlabeled cases)
        generalist_s = r.get("timings", {}).get("generalist_wall_s")
        rounds_s = r.get("timings", {}).get("prestage_wall_s")  # a run trained by its pre-stage (IFL's rounds)
        lines.append(f"| {run['run_id']} | {run['fold']} | {run['role']} | {run['num_train']} | {unlabeled} | "
                     f"{run['num_val']} | " + " | ".join(
                         fmt({"mean": fg[mm]["mean"], "std_over_cases": fg[mm]["std"]}, mm) for mm in METRICS)
                     + f" | {r['training'].get('epochs', '')} | {'' if train_s is None else f'{train_s:.0f}'} | "
                     + f"{'' if busy is None else f'{busy:.1f}'} | "
                     + (f"{generalist_s:.0f} |" if generalist_s is not None else
                        f"{rounds_s:.0f} (all rounds, trainings included) |" if rounds_s is not None else " |"))
    lines += [""]
    for plot in plots:
        lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    lines += ["Per-case numbers, folds and training curves: `results.json`.", ""]
    return "\n".join(lines)


def _gap_table(gap_closed: dict) -> List[str]:
    """Mean ± std over seeds; a cell over fewer seeds than others of its column says which (one row measured at
    seed 1 only is not the same evidence as one measured at seeds 0 and 1)."""
    gap_columns = sorted({c for t in gap_closed.values() for c in t}, key=_column_sort_key)
    column_seeds = {c: sorted({s for t in gap_closed.values() for s in t.get(c, {}).get("Dice", {}).get("per_seed", {})},
                              key=int) for c in gap_columns}
    lines = ["| trainer | metric | " + " | ".join(f"{c} labeled" for c in gap_columns) + " |",
             "|---|---" + "|---" * len(gap_columns) + "|"]
    for trainer, per_column in sorted(gap_closed.items()):
        for metric in ("Dice", "NSD"):
            cells = []
            for c in gap_columns:
                g = per_column.get(c, {}).get(metric)
                seeds = sorted(g["per_seed"], key=int) if g else []
                note = f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})" \
                    if g and seeds != column_seeds[c] else ""
                cells.append("" if g is None else fmt({"mean": g["mean"], "std_over_cases": g["std"]}, "Dice") + note)
            lines.append(f"| {trainer} | {metric} | " + " | ".join(cells) + " |")
    return lines


def _distance_unit(data: dict) -> str:
    """What HD95 and the NSD tolerance are in: 'px' for natural images; results.json files from before the unit was
    recorded were all in mm."""
    return data["metrics"].get("distance_unit", "mm")


def _per_domain_sections(data: dict, columns: List[str], upper_label: str) -> List[str]:
    """The tables above once more for the test cases of each domain (in-domain / cross-domain)."""
    by_domain = data.get("by_test_domain") or {}
    if not by_domain:
        return []
    unit = _distance_unit(data)
    lines = ["## Per test domain", "",
             "The same numbers for the test cases of each domain separately (domains from the dataset's "
             "`domains.json`). In-domain: the domain the labeled cases come from (`--labeled-domain`); cross-domain: "
             "a domain with no labeled case (its non-test cases may be in the unlabeled pool and the fully "
             "supervised fold). Gap closed is computed on each domain's test cases.", ""]
    for domain, entry in by_domain.items():
        setting = f" ({entry['setting']})" if entry.get("setting") else ""
        groups = f" from {entry['num_test_groups']} held-out groups" if entry.get("num_test_groups") else ""
        lines += [f"### {domain}{setting}: {entry['num_test_cases']} test cases{groups}", ""]
        for metric, title in (("Dice", "Dice"), ("HD95", f"HD95 ({unit})"), ("NSD", "NSD")):
            lines += [f"{title}:", ""] + _metric_table(entry, metric, "std_over_cases", columns, upper_label) + [""]
        lines += ["Fraction of the gap closed:", ""] + _gap_table(entry["gap_closed"]) + [""]
    return lines


def _class_name(data: dict, key: str) -> str:
    for trainer in data["aggregates"].values():
        for entry in trainer.values():
            if key in entry["per_class"]:
                return entry["per_class"][key]["name"]
    return key


def _cost_table(cost: dict) -> List[str]:
    rows = cost.get("rows", [])
    base = next((r for r in rows if r.get("trainer") == "nnUNetTrainer"), None)
    lines = ["| trainer | s/iteration | x nnUNetTrainer | peak memory (MB) | x nnUNetTrainer |", "|---|---|---|---|---|"]
    for r in rows:
        rt = r["seconds_per_iteration"] / base["seconds_per_iteration"] if base else math.nan
        rm = r["memory_mb"] / base["memory_mb"] if base else math.nan
        lines.append(f"| {r['trainer']} | {r['seconds_per_iteration']:.3f} | {rt:.2f} | {r['memory_mb']:.0f} | "
                     f"{rm:.2f} |")
    return lines


def load_cost(path: str) -> dict:
    from nnunet_foundation.benchmark.settings import BenchmarkError

    try:
        with open(path) as f:
            cost = json.load(f)
        assert isinstance(cost.get("rows"), list) and all(
            {"trainer", "seconds_per_iteration", "memory_mb"} <= set(r) for r in cost["rows"])
    except (OSError, ValueError, AssertionError, AttributeError):
        raise BenchmarkError(f"--cost {path}: expected the JSON written by 'python benchmarks/trainer_cost.py "
                             f"--json FILE' ({{'header': ..., 'rows': [{{'trainer', 'seconds_per_iteration', "
                             f"'memory_mb', ...}}]}})") from None
    return cost


# ---------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _number(x, missing: float = 0.0) -> float:
    """JSON null / NaN -> ``missing`` (e.g. no error bar for a single seed)."""
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _trainer_colors(plt, data: dict) -> Dict[str, str]:
    """One colour per trainer, the same in every plot (bounds first)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # every row of the report, cached trainers and the generalist row included (not one grey for all of them)
    trainers = [data["trainers"]["lower_bound"]] + [t for t in data["trainers"]["semi_supervised"]] + \
        _rows_in_order(data.get("aggregates", {}))
    return {t: cycle[i % len(cycle)] for i, t in enumerate(dict.fromkeys(trainers))}


def plot_metric_vs_labeled(data: dict, metrics, path: Path) -> None:
    """One panel per metric, every row of the report against the labeled count (bounds as lines)."""
    _plot_panels(data, [(data["aggregates"], metric, None) for metric in metrics], path)


def plot_dice_per_domain(data: dict, path: Path) -> None:
    """Dice against the labeled count, one panel per test domain (in-domain / cross-domain): the pooled plot hides
    a method that helps in one domain and hurts in the other."""
    panels = []
    for domain, entry in data["by_test_domain"].items():
        setting = f" ({entry['setting']})" if entry.get("setting") else ""
        panels.append((entry["aggregates"], "Dice", f"{domain}{setting}, {entry['num_test_cases']} test cases"))
    _plot_panels(data, panels, path)


def _plot_panels(data: dict, panels, path: Path) -> None:
    """panels: (aggregates, metric, title prefix or None) each; one shared legend below them."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    colors = _trainer_colors(plt, data)
    unit = _distance_unit(data)
    several_seeds = len(data["seeds"]) > 1
    std_key = "std_over_seeds" if several_seeds else "std_over_cases"
    for ax, (aggregates, metric, title) in zip(axes[0], panels):
        bounds = bound_seeds(aggregates)
        for trainer in _rows_in_order(aggregates):
            entries = aggregates[trainer]
            columns = sorted((c for c in entries if c != "all"), key=int)
            color = colors.get(trainer, "gray")
            if columns:
                x = [int(c) for c in columns]
                y = [_number(entries[c]["foreground_mean"][metric]["mean"], math.nan) for c in columns]
                err = [_number(entries[c]["foreground_mean"][metric][std_key]) for c in columns]
                role = entries[columns[0]]["role"]
                kind = "labeled only" if role == LOWER else COTRAINED_SAM_LABEL if role == COTRAINED_SAM \
                    else PRESTAGE_LABEL if entries[columns[0]].get("prestage") \
                    else CACHED_LABEL if entries[columns[0]].get("pseudo_labels") else "semi-supervised"
                label = GENERALIST_LABEL if role == GENERALIST else f"{trainer} ({kind})"
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color, label=label)
                for c, xi, yi in zip(columns, x, y):  # a point over other seeds than its bound's says which
                    note = seeds_note(entries[c], c, bounds).strip(" ()")
                    if note and not math.isnan(yi):
                        ax.annotate(note, (xi, yi), xytext=(5, 0), textcoords="offset points", fontsize=6,
                                    color=color, va="center")
            if "all" in entries:
                stats = entries["all"]["foreground_mean"][metric]
                ax.axhline(_number(stats["mean"], math.nan), color=color, ls="--",
                           label=f"{trainer}, all {', '.join(map(str, entries['all']['num_train']))} labeled "
                                 f"(upper bound)")
                std = _number(stats[std_key])
                ax.axhspan(_number(stats["mean"]) - std, _number(stats["mean"]) + std, color=color, alpha=0.1)
        ax.set_xticks(data["labeled"])
        ax.set_xlabel("labeled training cases")
        ax.set_ylabel(f"{metric}{f' ({unit})' if metric == 'HD95' else ''}, test set")
        spread = f"{metric}: mean ± std over {'seeds' if several_seeds else 'test cases'}"
        ax.set_title(f"{title}\n{spread}" if title else spread, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{data['dataset']} {data['configuration']}, budget '{data['budget']['name']}'", fontsize=10)
    fig.tight_layout()
    # below the plots: the row labels are long and would hide points inside the axes; every panel's rows (a domain
    # panel may lack a row another has)
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_training_curves(data: dict, path: Path) -> None:
    """Rows: labeled counts (and 'all'); panels: train loss, val loss, pseudo Dice (EMA), unsupervised loss."""
    plt = _plt()
    panels = [("train_losses", "train loss"), ("val_losses", "validation loss"),
              ("ema_fg_dice", "pseudo Dice (moving average, val)"), ("unsup_loss", "unsupervised loss")]
    columns = sorted({("all" if r["run"]["num_labeled"] is None else str(r["run"]["num_labeled"]))
                      for r in data["runs"]}, key=_column_sort_key)
    colors = _trainer_colors(plt, data)
    fig, axes = plt.subplots(max(len(columns), 1), len(panels), figsize=(4.2 * len(panels), 3 * max(len(columns), 1)),
                             squeeze=False)
    for row, column in enumerate(columns):
        for col, (key, title) in enumerate(panels):
            ax = axes[row][col]
            for r in data["runs"]:
                run = r["run"]
                if ("all" if run["num_labeled"] is None else str(run["num_labeled"])) != column:
                    continue
                values = r["training"].get("curves", {}).get(key)
                if values:
                    ax.plot(range(1, len(values) + 1), values, color=colors.get(run["trainer"], "gray"), alpha=0.85,
                            marker="." if len(values) < 20 else None, label=f"{run['trainer']} (seed {run['seed']})")
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged by these trainers", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes, color="gray")
            ax.set_title(f"{'all' if column == 'all' else column} labeled: {title}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(bench, results: List[dict], missing: List, command: Optional[str] = None,
                  cost: Optional[dict] = None) -> dict:
    """results.json, report.md and the PNGs in the output folder; returns the results.json content."""
    out = bench.output
    data = build_results(bench, results, missing, command, cost)
    # each PNG's file name and what draws it; results.json lists the names (the command's closing lines, readers)
    plots = {}
    if results:
        plots["dice_vs_labeled.png"] = lambda path: plot_metric_vs_labeled(data, ["Dice"], path)
        plots["nsd_hd95_vs_labeled.png"] = lambda path: plot_metric_vs_labeled(data, ["NSD", "HD95"], path)
        if data.get("by_test_domain"):
            plots["dice_vs_labeled_per_domain.png"] = lambda path: plot_dice_per_domain(data, path)
        plots["training_curves.png"] = lambda path: plot_training_curves(data, path)
    data["plots"] = list(plots)
    write_json(data, str(out / "results.json"))
    for name, draw in plots.items():
        draw(out / name)
    # results.json went through JSON (NaN and all); render from what was written so both agree exactly
    with open(out / "results.json") as f:
        written = json.load(f)
    (out / "report.md").write_text(render_markdown(written, written["plots"]))
    return written


def command_line(argv: List[str]) -> str:
    return shlex.join(["nnunet-foundation", *argv])
