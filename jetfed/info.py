"""The GetInfo answer: enough about a service for a coordinator to check its fleet
(task, class list, architecture and data) before a round."""

from __future__ import annotations

import platform
from typing import List

import grpc
import torch

import jetfed
from jetfed.v1 import info_pb2


def service_info(
    name: str, role: str, device: str, *, task: str, model: str, classes: List[str], model_digest: str,
    label_counts: List[int], dataset_size: int,
) -> info_pb2.GetInfoResponse:
    return info_pb2.GetInfoResponse(
        name=name,
        role=role,
        device=device,
        model=model,
        dataset_size=dataset_size,
        label_counts=label_counts,
        jetfed_version=jetfed.__version__,
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        grpc_version=grpc.__version__,
        task=task,
        class_names=classes,
        model_digest=model_digest,
    )
