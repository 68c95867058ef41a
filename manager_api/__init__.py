"""The manager: REST API, desired state in etcd, deployers, and the `hydro` command line."""

from protos.grpc_environment import apply_grpc_defaults

# Before anything imports grpc: every entry point imports this package first.
apply_grpc_defaults()
