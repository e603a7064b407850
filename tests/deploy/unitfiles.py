"""Just enough of systemd's unit and environment-file rules to see the command line a
unit runs: continuation lines, Environment= defaults overridden by the env file,
`${VAR}` as one word and a lone `$VAR` split into words, `%i` as the instance."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, List


def unit_settings(path: Path) -> Dict[str, List[str]]:
    """Every `Key=value` of a unit file, in order, sections ignored."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    settings: Dict[str, List[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def env_file(path: Path) -> Dict[str, str]:
    """KEY=VALUE lines; one pair of surrounding quotes is removed, as systemd does."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key.strip()] = " ".join(shlex.split(value)) if value.strip() else ""
    return env


def command_line(unit: Path, env_path: Path, instance: str = "") -> List[str]:
    """The argv systemd would run for `unit` with `env_path` as its EnvironmentFile."""
    settings = unit_settings(unit)
    env: Dict[str, str] = {}
    for assignments in settings.get("Environment", []):
        for pair in shlex.split(assignments):
            key, _, value = pair.partition("=")
            env[key] = value
    env.update(env_file(env_path))
    (exec_start,) = settings["ExecStart"]
    argv: List[str] = []
    for word in shlex.split(exec_start.replace("%i", instance)):
        lone = re.fullmatch(r"\$(\w+)", word)
        if lone:
            argv.extend(env.get(lone.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv
