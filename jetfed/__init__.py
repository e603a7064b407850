"""jetfed: federated learning for fleets of NVIDIA Jetson boards.

The shared kernel of the services: generated gRPC stubs (``jetfed.v1``), the weight
codec, the model registry, data loading and partitioning, configuration and the
serving scaffold. It holds no service logic; worker, evaluator and coordinator meet
only on the wire.
"""

__version__ = "0.1.0"
