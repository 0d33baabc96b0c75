"""Types: the .pyi stubs of the extension modules match the runtime (mypy.stubtest), and
the package type-checks with them (mypy)."""

import subprocess
import sys
from pathlib import Path

import mypy.stubtest  # noqa: F401  (in the test extra: a missing mypy fails, not skips)

ALLOWLIST = Path(__file__).with_name("stubtest_allowlist.txt")


def test_stubtest_extension_modules():
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "statecore._core", "statecore._kv",
         "--allowlist", str(ALLOWLIST)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        print(proc.stdout)
        print(proc.stderr, file=sys.stderr)
    assert proc.returncode == 0, f"stubtest failed:\n{proc.stdout}\n{proc.stderr}"


def test_the_package_type_checks():
    """statecore ships py.typed: a user's mypy reads our annotations, so they must hold."""
    # As installed (-p: found on the path, as a user's mypy finds it), with the project's
    # settings (pyproject.toml: optional peers may be missing).
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "-p", "statecore"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}\n{proc.stderr}"
