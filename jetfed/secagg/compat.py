"""Which strategies secure aggregation composes with: those that need only the sum of
the updates. The coordinator never sees one update, so an aggregator that ranks,
trims or compares updates cannot run, and is refused at start-up, not mid-run."""

from __future__ import annotations

from jetfed.secagg.errors import SecAggConfigError

SUM_AGGREGATORS = ("mean",)


def check_aggregator(aggregator: str, *, control_variates: bool = False) -> None:
    """Refuse an aggregator (or SCAFFOLD's control variates) that needs each update."""
    if aggregator not in SUM_AGGREGATORS:
        raise SecAggConfigError(f"secagg: aggregator {aggregator!r} needs each worker's update, and secure "
                                "aggregation gives the coordinator only their sum; use aggregator = 'mean' "
                                "(fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad) or turn secagg off")
    if control_variates:
        raise SecAggConfigError("secagg: SCAFFOLD's control variates would need a second masked vector per "
                                "worker, which jetfed's secure aggregation does not carry; use a mean-based "
                                "strategy or turn secagg off")
