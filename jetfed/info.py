"""The GetInfo answer: enough about a service for a coordinator to check its fleet."""

from __future__ import annotations

import platform
from typing import List

import grpc
import torch

import jetfed
from jetfed.v1 import info_pb2


def service_info(
    name: str, role: str, device: str, model: str, label_counts: List[int]
) -> info_pb2.GetInfoResponse:
    return info_pb2.GetInfoResponse(
        name=name,
        role=role,
        device=device,
        model=model,
        dataset_size=sum(label_counts),
        label_counts=label_counts,
        jetfed_version=jetfed.__version__,
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        grpc_version=grpc.__version__,
    )
