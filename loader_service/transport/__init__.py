"""Data planes: tensor bytes in gRPC messages, or shared-memory slots for trainers on the node."""

from loader_service.transport.grpc_bytes import batch_response, encode_tensor, sample_meta
from loader_service.transport.grpc_bytes import warm_up as warm_up_message_kernels

__all__ = ["batch_response", "encode_tensor", "sample_meta", "warm_up_message_kernels"]
