"""Semi-supervised settings: declared per trainer, overridable without editing code, recorded per run.

nnU-Net passes no extra arguments to trainers, so settings come from three layers (later wins):

1. the trainer class's defaults (``default_settings``; class-name variants override them),
2. a JSON file named by the environment variable ``nnUNet_ssl_config`` (keys = setting names; an optional
   per-trainer section ``{"nnUNetTrainerCPS": {...}}`` applies only to that trainer and its subclasses),
3. environment variables ``nnUNet_ssl_<name>``, e.g. ``nnUNet_ssl_unlabeled_batch_size=4``.

The resolved settings are written to ``<output_folder>/ssl_settings.json``. Resuming (``--c``) with settings that
differ from the recorded ones is refused, so that one run never mixes two configurations.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

CONFIG_ENV = "nnUNet_ssl_config"
ENV_PREFIX = "nnUNet_ssl_"
SETTINGS_FILE = "ssl_settings.json"


class SettingsError(ValueError):
    pass


def _convert(name: str, raw: str, default: Any, source: str) -> Any:
    """Parse an environment-variable string into the type of the default."""
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "t", "yes", "y"):
                return True
            if raw.lower() in ("0", "false", "f", "no", "n"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (list, dict)):
            return json.loads(raw)
        if default is None:
            # JSON when it parses (numbers, lists, objects), else the string itself (e.g. the path of a JSON file)
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return raw
        return raw
    except (ValueError, json.JSONDecodeError):
        raise SettingsError(f"{source}: cannot read {raw!r} as the {type(default).__name__} that setting "
                            f"'{name}' expects (default {default!r}).") from None


def _check_type(name: str, value: Any, default: Any, source: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SettingsError(f"{source}: setting '{name}' must be true or false, got {value!r}.")
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, type(default)):
        raise SettingsError(f"{source}: setting '{name}' must be a {type(default).__name__} "
                            f"(default {default!r}), got {value!r}.")
    return value


def resolve_settings(defaults: Mapping[str, Any], trainer_mro_names: list, environ: Mapping[str, str] = None) -> dict:
    """Merge defaults, the config file and environment variables; unknown names are an error, not a silent no-op."""
    environ = os.environ if environ is None else environ
    settings = dict(defaults)
    valid = ", ".join(sorted(defaults))

    config_path = environ.get(CONFIG_ENV)
    if config_path:
        if not os.path.isfile(config_path):
            raise SettingsError(f"{CONFIG_ENV}={config_path}: file not found. Point it to a JSON file of "
                                f"semi-supervised settings, or unset it.")
        try:
            with open(config_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{config_path}: not valid JSON ({e}).") from None
        if not isinstance(config, dict):
            raise SettingsError(f"{config_path}: expected a JSON object of setting names to values.")
        sections = {k: v for k, v in config.items() if k.startswith("nnUNetTrainer") and isinstance(v, dict)}
        flat = {k: v for k, v in config.items() if k not in sections}
        # a section applies to its trainer and subclasses (most specific last, so it wins)
        layers = [flat] + [sections[n] for n in reversed(trainer_mro_names) if n in sections]
        for layer in layers:
            for name, value in layer.items():
                if name not in defaults:
                    raise SettingsError(f"{config_path}: unknown setting '{name}' for {trainer_mro_names[0]}. "
                                        f"Valid settings: {valid}.")
                settings[name] = _check_type(name, value, defaults[name], config_path)

    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_ENV:
            continue
        name = key[len(ENV_PREFIX):]
        if name not in defaults:
            raise SettingsError(f"environment variable {key}: unknown setting '{name}' for {trainer_mro_names[0]}. "
                                f"Valid settings: {valid}.")
        settings[name] = _convert(name, raw, defaults[name], f"environment variable {key}")
    return settings


def record_or_check_settings(output_folder: str, settings: dict, trainer_name: str, resuming: bool) -> None:
    """Write the settings of a new run; on resume, refuse settings that differ from the recorded ones."""
    path = os.path.join(output_folder, SETTINGS_FILE)
    record = {"trainer": trainer_name, "settings": settings}
    if resuming and os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        old = previous.get("settings", {})
        changed = {k: (old.get(k, "<missing>"), settings.get(k, "<missing>"))
                   for k in sorted(set(old) | set(settings)) if old.get(k, "<missing>") != settings.get(k, "<missing>")}
        if changed:
            lines = "\n".join(f"  {k}: recorded {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise SettingsError(
                f"Refusing to resume: the semi-supervised settings differ from those recorded in {path}:\n{lines}\n"
                f"Restore the recorded settings (environment variables {ENV_PREFIX}<name> / {CONFIG_ENV}) to "
                f"continue this run, or start a new run without --c (or in another output folder) to use the new "
                f"ones.")
        return
    os.makedirs(output_folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
