"""Run a multi-process helper so that a timeout kills the whole process group, grandchildren included."""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Like `subprocess.run(check=True, capture_output=True)`, but a timeout kills every process it started."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv, out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
