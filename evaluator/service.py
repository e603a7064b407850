"""The Evaluator servicer: logic only; transport lives in evaluator.cli."""

from __future__ import annotations

from typing import AsyncIterator, List

import grpc

from jetfed.info import service_info
from jetfed.scoring import Scorer
from jetfed.status import rpc_status
from jetfed.v1 import evaluation_pb2, evaluator_pb2_grpc, info_pb2


class EvaluatorService(evaluator_pb2_grpc.EvaluatorServicer):
    def __init__(self, name: str, scorer: Scorer, label_counts: List[int], device_label: str) -> None:
        self._name = name
        self._scorer = scorer
        self._label_counts = label_counts
        self._device_label = device_label

    async def GetInfo(self, request: info_pb2.GetInfoRequest, context: grpc.aio.ServicerContext) -> info_pb2.GetInfoResponse:
        return service_info(self._name, "evaluator", self._device_label, self._scorer.model_name, self._label_counts)

    async def Evaluate(
        self, request_iterator: AsyncIterator[evaluation_pb2.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> evaluation_pb2.EvaluateResponse:
        async with rpc_status(context, "Evaluate"):
            return await self._scorer.score(request_iterator)
