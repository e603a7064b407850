"""`jetfed <command>`: dispatches to the commands services register under the
`jetfed.commands` entry-point group, so this package never imports a service."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Dict, List, Optional

GROUP = "jetfed.commands"


def _commands() -> Dict[str, "metadata.EntryPoint"]:
    found = metadata.entry_points()
    if hasattr(found, "select"):
        entries = found.select(group=GROUP)
    else:  # Python 3.8/3.9 return a dict of groups
        entries = found.get(GROUP, [])
    return {entry.name: entry for entry in entries}


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not args or args[0] in ("-h", "--help") or args[0] not in commands:
        names = ", ".join(sorted(commands)) or "none installed"
        print(f"usage: jetfed COMMAND [options]   (commands: {names}; COMMAND --help for its options)", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    return int(commands[args[0]].load()(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
