"""Data planes: tensor bytes in gRPC messages, or shared-memory slots for trainers on the node."""

from loader_service.transport.grpc_bytes import batch_response, encode_tensor, sample_meta

__all__ = ["batch_response", "encode_tensor", "sample_meta"]
