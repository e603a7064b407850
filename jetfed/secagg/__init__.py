"""Secure aggregation (Bonawitz et al. 2017, with SecAgg+'s per-run keys) in one extra
round trip per round: see docs/secagg.md. Pure protocol and arithmetic; the services
map `messages` to protobuf at their border."""

from __future__ import annotations

from jetfed.secagg.client import SecAggClient
from jetfed.secagg.compat import SUM_AGGREGATORS, check_aggregator
from jetfed.secagg.errors import (AggregateOutOfRange, BelowThreshold, ProtocolViolation, SecAggConfigError,
                                  SecAggError, SecAggUnavailable)
from jetfed.secagg.fixed_point import FixedPoint
from jetfed.secagg.server import Aggregate, SecAggServer

__all__ = ["Aggregate", "AggregateOutOfRange", "BelowThreshold", "FixedPoint", "ProtocolViolation", "SUM_AGGREGATORS",
           "SecAggClient", "SecAggConfigError", "SecAggError", "SecAggServer", "SecAggUnavailable",
           "check_aggregator"]
