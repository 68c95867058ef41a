"""The xDS control plane: etcd topology in, Envoy resources out over ADS (state of the world and delta)."""

from protos.grpc_environment import apply_grpc_defaults

# Before anything imports grpc: every entry point imports this package first.
apply_grpc_defaults()
