"""Running the nnUNetv2_* and nnunet-foundation console scripts as logged subprocesses (benchmark, ifl, demo).

One place decides which executable runs (the one installed next to this Python, so a venv works without being
activated), which environment it gets (nnU-Net must find this package's trainers) and how its output is kept (all
of it in a log file, a few progress lines on the terminal, the log's tail in the error)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional


class CommandFailed(RuntimeError):
    """A logged command exited non-zero; ``tail`` holds the last lines of its log."""

    def __init__(self, cmd: List[str], returncode: int, log_file: Path, tail: str):
        self.cmd, self.returncode, self.log_file, self.tail = cmd, returncode, Path(log_file), tail
        super().__init__(f"'{' '.join(cmd)}' failed (exit code {returncode}); full output in {log_file}")


def console_script(name: str) -> str:
    """The console script next to this Python (the venv's), or the bare name for PATH lookup."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def nnunet_environment(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The caller's environment (or ``base``) with this package's trainer folder added to nnUNet_extTrainer (kept
    after any folders the user set) and unbuffered Python output, so progress lines arrive as they are printed."""
    from nnunet_foundation.paths import trainer_path

    env = dict(os.environ if base is None else base)
    ours = str(trainer_path())
    paths = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if ours not in paths:
        paths.append(ours)
    env["nnUNet_extTrainer"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(cmd: List[str], env: Dict[str, str], log_file: Path,
               show: Optional[Callable[[str], bool]] = None, indent: str = "    ", tail_lines: int = 25) -> float:
    """Run ``cmd`` with its output appended to ``log_file`` (after a '$ cmd' line); lines for which ``show`` is true
    are also printed, indented. Returns the wall time in seconds; raises CommandFailed on a non-zero exit."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log_file, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen([console_script(cmd[0]), *cmd[1:]], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            log.flush()  # someone tailing the log of an hour-long pre-stage sees its progress as it comes
            if show is not None and show(line):
                print(indent + line.strip(), flush=True)
        returncode = proc.wait()
    if returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-tail_lines:])
        raise CommandFailed(cmd, returncode, log_file, tail)
    return time.time() - started
