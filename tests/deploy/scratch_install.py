"""install.sh run into scratch roots, never onto this machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JETSON = REPO / "deploy" / "jetson"


def run_install(destdir: Path, *args: str, repo: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """Run `repo`'s deploy/jetson/install.sh into `destdir`; keyword arguments are
    environment variables. A failure shows the script's own output."""
    assert str(destdir).strip("/"), "install.sh must never run without a scratch DESTDIR here"
    result = subprocess.run(
        ["bash", str(repo / "deploy/jetson/install.sh"), *args],
        env={**os.environ, "DESTDIR": str(destdir), **env}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"install.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result
