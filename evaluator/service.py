"""The Evaluator servicer: logic only; transport lives in evaluator.cli."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from jetfed.scoring import Scorer
from jetfed.status import rpc_status
from jetfed.v1 import evaluation_pb2, evaluator_pb2_grpc, info_pb2


class EvaluatorService(evaluator_pb2_grpc.EvaluatorServicer):
    def __init__(self, name: str, scorer: Scorer) -> None:
        self._name = name
        self._scorer = scorer

    async def GetInfo(self, request: info_pb2.GetInfoRequest, context: grpc.aio.ServicerContext) -> info_pb2.GetInfoResponse:
        return self._scorer.info(self._name, "evaluator")

    async def Evaluate(
        self, request_iterator: AsyncIterator[evaluation_pb2.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> evaluation_pb2.EvaluateResponse:
        async with rpc_status(context, "Evaluate"):
            return await self._scorer.score(request_iterator)
