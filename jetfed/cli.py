"""`jetfed <command>`: dispatches to the commands services register under the
`jetfed.commands` entry-point group, so this package never imports a service.

The help lists each command with the first sentence of its module's docstring, read
from the source file: importing worker or coordinator loads torch, seconds on a board,
only to print a line. A command whose imports fail for a missing package gets one line
naming the package and the fix, not a traceback."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from importlib import metadata
from typing import Dict, List, Optional

GROUP = "jetfed.commands"
DISTRIBUTION = "jetfed"
SUMMARY_WIDTH = 80
JETPACK_MODULES = ("torch", "torchvision")
JETPACK_FIX = (
    "this board's torch (JetPack's wheel, see deploy/jetson/README.md) "
    "or `pip install -r requirements/torch.txt`"
)
REINSTALL_FIX = "reinstall with deploy/jetson/install.sh, or `pip install <checkout>`"


def _commands() -> Dict[str, "metadata.EntryPoint"]:
    found = metadata.entry_points()
    if hasattr(found, "select"):
        entries = found.select(group=GROUP)
    else:  # Python 3.8/3.9 return a dict of groups
        entries = found.get(GROUP, [])  # type: ignore[arg-type]  # typeshed describes 3.10+'s EntryPoints, not this dict
    return {entry.name: entry for entry in entries}


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (jetfed is not installed: pip install <checkout>)"


def _docstring(module: str) -> str:
    """The module's docstring, parsed from its source without running it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    try:
        with open(spec.origin, encoding="utf-8") as source:
            return ast.get_docstring(ast.parse(source.read())) or ""
    except (OSError, SyntaxError, ValueError):
        return ""


def shorten(docstring: str, width: int = SUMMARY_WIDTH) -> str:
    """One line from a docstring: its first sentence without the "`jetfed x`: " prefix
    or parentheses; past `width`, cut at the last clause, else the last word."""
    text = " ".join(docstring.split())
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    text = re.sub(r"^`jetfed [^`]*`:\s*", "", text)
    text = re.sub(r"\s*\([^)]*\)", "", text)
    first = text.split(" ", 1)[0]
    if len(first) == 1 or not first.isupper():  # "Provisioning" reads like the others; "CA" stays
        text = text[:1].lower() + text[1:]
    if len(text) <= width:
        return text
    head = text[:width]
    for mark in (": ", "; ", ", "):
        if mark in head:
            return head[:head.rindex(mark)]
    return head[:head.rindex(" ")] + "..." if " " in head else head


def usage(commands: Dict[str, "metadata.EntryPoint"]) -> str:
    lines = ["usage: jetfed COMMAND [options]   (jetfed COMMAND --help for its options)", "", "commands:"]
    if not commands:
        lines.append("  none installed: reinstall jetfed (pip install <checkout>)")
    width = max((len(name) for name in commands), default=0)
    for name in sorted(commands):
        summary = shorten(_docstring(commands[name].value.partition(":")[0]))
        lines.append(f"  {name.ljust(width)}  {summary}".rstrip())
    lines += ["", "  --version  print jetfed's version"]
    return "\n".join(lines)


def _missing_module(exc: BaseException) -> Optional[str]:
    """The module an import failure lacks, following `raise ... from` causes (a command
    may re-raise its own ImportError about an optional package)."""
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            return cause.name
        cause = cause.__cause__
    return None


def _extra_of(module: str) -> Optional[str]:
    """The jetfed extra whose requirement is named like the module's top-level package."""
    top = re.sub(r"[-_.]+", "-", module.split(".")[0]).lower()
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    for requirement in requires:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if name and extra and re.sub(r"[-_.]+", "-", name.group(0)).lower() == top:
            return extra.group(1)
    return None


def missing_message(command: str, module: str) -> str:
    """One line saying what is missing and what installs it."""
    top = module.split(".")[0]
    if top in JETPACK_MODULES:
        fix = f"install {JETPACK_FIX}"
    else:
        extra = _extra_of(module)
        if extra is not None:
            fix = f"it is the {extra!r} extra: pip install '<checkout or jetfed wheel>[{extra}]'"
        else:
            fix = f"it is missing from this install: {REINSTALL_FIX}"
    return f"jetfed {command}: no module named {top!r}; {fix}"


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if args and args[0] == "--version":
        print(f"jetfed {_version()}")
        return 0
    if args and args[0] in ("-h", "--help"):
        print(usage(commands))
        return 0
    if not args or args[0] not in commands:
        unknown = f"jetfed: unknown command {args[0]!r}\n\n" if args else ""
        print(unknown + usage(commands), file=sys.stderr)
        return 2
    try:
        return int(commands[args[0]].load()(args[1:]) or 0)
    except ImportError as exc:  # at load, or a command's lazy import (rich, matplotlib)
        module = _missing_module(exc)
        if module is None:
            raise
        print(missing_message(args[0], module), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
