"""What `statecore bench` runs against: which peers are present (and their versions) and
the machine it runs on."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Any, Dict, Sequence

import numpy as np

from .common import PEERS
from .lmdb_peer import lmdb_version
from .redis_peer import redis_version

log = logging.getLogger("statecore")


def detect_peers(skip: Sequence[str]) -> Dict[str, str]:
    """peer -> version, "not installed" or "disabled" (plus "redis_binary" when found)."""
    out: Dict[str, str] = {}
    bad = set(skip) - set(PEERS)
    if bad:
        raise ValueError(f"skip must name peers among {PEERS}, got {sorted(bad)}")
    out["fork"] = "disabled" if "fork" in skip else "os.fork"
    out["numpy"] = "disabled" if "numpy" in skip else f"numpy {np.__version__}"
    if "lmdb" in skip:
        out["lmdb"] = "disabled"
    else:
        try:
            out["lmdb"] = lmdb_version()
        except ImportError:
            out["lmdb"] = "not installed"
    if "redis" in skip:
        out["redis"] = "disabled"
    else:
        out.update(_redis_peer())
    return out


def _redis_peer() -> Dict[str, str]:
    binary = os.environ.get("STATECORE_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        return {"redis": "not installed"}
    try:
        return {"redis": redis_version(binary), "redis_binary": binary}
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("statecore bench: cannot run %s: %s", binary, e)
        return {"redis": "not installed"}


def machine() -> Dict[str, Any]:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = next((w.strip("[]") for w in f.read().split() if w.startswith("[")), "?")
    except OSError:
        thp = "?"
    return {"cpus": os.cpu_count(), "thp": thp, "load_before": loadavg()}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"
