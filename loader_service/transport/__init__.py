"""Data planes: tensor bytes in gRPC messages, or shared-memory slots for trainers on the node."""

from loader_service.transport.grpc_bytes import encode_batch, encode_tensor, sample_meta

__all__ = ["encode_batch", "encode_tensor", "sample_meta"]
