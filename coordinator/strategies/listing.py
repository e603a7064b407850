"""`jetfed strategies`: the strategies a run can name, each with its parameters and
their defaults, as --strategy and [strategy] take them."""

from __future__ import annotations

import argparse
from typing import List, Optional

from coordinator.strategies.registry import PARAMS, PRESETS, StrategySpec


def lines() -> List[str]:
    out = ["Strategies (--strategy NAME, --strategy-param KEY=VALUE; in federation.toml: [strategy] name = "
           "\"NAME\" and KEY = VALUE):", ""]
    for preset in PRESETS.values():
        mode = "asynchronous" if preset.asynchronous else "synchronous"
        out.append(f"{preset.name}  ({mode}; {preset.reference})")
        out.append(f"    {preset.summary}")
        for key, value in StrategySpec(preset.name).resolved().items():
            out.append(f"    {f'{key} = {value!r}':<30} {PARAMS[key].help}")
        out.append("")
    out.append("Any strategy's parts can be swapped: --strategy fedadam --strategy-param aggregator=median is a "
               "robust FedAdam.")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argparse.ArgumentParser(prog="jetfed strategies", description=__doc__).parse_args(argv)
    print("\n".join(lines()))
    return 0
