"""Model runtimes (the Open Inference Protocol over gRPC and HTTP) and the pipeline runtime."""

import os

# The pipeline runtime forks only to exec its shadow worker at once, while gRPC's threads are busy. gRPC's fork
# handlers, on by default in grpcio, kill such a child (SIGSEGV) before its exec about one time in thirty
# (tests/runtimes/test_shadow_spawn.py). Read when gRPC is first imported: every runtime entry point
# (`python -m runtimes`, `python -m runtimes.pipeline`) imports this package before gRPC, as manager_api does.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
