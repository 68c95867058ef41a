"""The manager: REST API, desired state in etcd, deployers, and the `hydro` command line."""

import os

# Our processes fork only to exec a child at once (manager_api.processes). gRPC's fork handlers, on by default in
# grpcio, make such a child crash (SIGSEGV, SIGABRT) before its exec about one time in seven while etcd calls are in
# flight. Read when gRPC is first imported: this package is imported before aetcd/grpc by every entry point.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
