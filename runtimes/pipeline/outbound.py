"""The gRPC channels to the sidecar's outbound listener, over which the pipeline calls stages and shadows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from protos import inference_pb2 as pb

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

InferCall = Callable[..., Awaitable[pb.ModelInferResponse]]


class OutboundChannel:
    """A long-lived HTTP/2 connection of its own to the outbound listener, and its ModelInfer call.

    Its own connection (a local subchannel pool: gRPC would otherwise share one connection between channels to the
    same address) keeps the stage calls and the shadow calls apart: up to ``max_in_flight`` slow shadow streams
    never share a connection, its flow-control window or an Envoy worker's queue with the caller's stage calls.
    """

    def __init__(self, address: str, max_message_bytes: int) -> None:
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self.call: InferCall = self._channel.unary_unary(
            MODEL_INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )

    async def close(self) -> None:
        """Close the channel (calls still running fail with CANCELLED)."""
        await self._channel.close()
