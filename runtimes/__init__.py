"""Model runtimes (the Open Inference Protocol over gRPC and HTTP) and the pipeline runtime."""

from protos.grpc_environment import apply_grpc_defaults

# Before anything imports grpc: every entry point imports this package first.
apply_grpc_defaults()
