"""jetfed.v1.Coordinator: the run's board as protobuf, for grpcurl and dashboards."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from coordinator.board import FAILED, FINISHED, RunBoard
from jetfed.v1 import coordinator_pb2 as pb
from jetfed.v1 import coordinator_pb2_grpc

_RUN_STATES = {"starting": pb.RUN_STATE_STARTING, "running": pb.RUN_STATE_RUNNING,
               "finished": pb.RUN_STATE_FINISHED, "failed": pb.RUN_STATE_FAILED}
_WORKER_STATES = {"idle": pb.WORKER_STATE_IDLE, "training": pb.WORKER_STATE_TRAINING,
                  "done": pb.WORKER_STATE_DONE, "failed": pb.WORKER_STATE_FAILED,
                  "connecting": pb.WORKER_STATE_CONNECTING}


def status_message(board: RunBoard) -> pb.RunStatus:
    return pb.RunStatus(
        state=_RUN_STATES[board.state], round=board.round, rounds=board.rounds,
        elapsed_seconds=board.elapsed, eta_seconds=board.eta, out_dir=board.out_dir, error=board.error,
        workers=[
            pb.WorkerStatus(
                name=w.name, address=w.address, state=_WORKER_STATES[w.state], last_contribution=w.last_contribution,
                consecutive_failures=w.failures, last_error=w.last_error,
                last_train_seconds=w.last_train_seconds, last_train_loss=w.last_train_loss,
                last_base_version=w.last_base_version, last_staleness=w.last_staleness,
                epsilon=w.epsilon, delta=w.delta,
            )
            for w in board.workers.values()
        ],
        last_evaluated_round=board.last_evaluated_round,
        last_evaluation=[
            pb.ModelScore(model=s.model, accuracy=s.accuracy, loss=s.loss, correct=s.correct, total=s.total,
                          metrics=s.metrics)
            for s in board.last_evaluation
        ],
    )


class CoordinatorStatusService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, board: RunBoard) -> None:
        self._board = board

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        return pb.GetStatusResponse(status=status_message(self._board))

    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchStatusResponse]:
        seen = self._board.version
        while True:
            # Decided with the message, not after sending it: the run may end while a
            # message is on its way, and the watcher must still get the final state.
            final = self._board.state in (FINISHED, FAILED)
            yield pb.WatchStatusResponse(status=status_message(self._board))
            if final:
                return
            seen = await self._board.wait_change(seen)
