"""How every Hydro Serving process runs grpcio: settings grpcio reads from the environment when it starts.

grpcio reads them once, when it is first imported, so each package that starts a process (runtimes, manager_api,
xds_control) calls ``apply_grpc_defaults`` in its ``__init__``, before anything imports grpc; benchmarks call it
first thing too. An operator's own GRPC_EXPERIMENTS wins, even empty (grpcio's own default); grpcio's fork handlers
are off whatever the environment says. This module must not import grpc.
"""

from __future__ import annotations

import os

#: Our processes fork only to exec a child at once (the deployer's runtimes and sidecars, the pipeline runtime's
#: shadow worker). grpcio's fork handlers, on by default, kill such a child (SIGSEGV, SIGABRT) before its exec when
#: gRPC threads are busy: one child in seven while etcd calls were in flight (tests/manager_api/test_fork_safety.py),
#: one in thirty under a pipeline's load (tests/runtimes/test_shadow_spawn.py). Even with gRPC idle, the child's
#: handler restarts gRPC's poller thread and Popen's close_fds closes its epoll fd under it: about one child in a
#: hundred died with only "(event_engine) Epoll1Poller ... epoll_wait error: Bad file descriptor" in its log
#: (grpc/grpc#43055; a flake of tests/runtimes/test_runtime_processes.py). Forced, not a default: nothing of ours
#: wants the handlers, and an environment that set the variable (a shell, an operator) used to turn them back on.
FORK_SUPPORT = ("GRPC_ENABLE_FORK_SUPPORT", "0")

#: grpcio's older I/O layer instead of EventEngine, on by default for Python since grpcio 1.80. Measured with grpcio
#: 1.85 on 2 cores (docs/runtimes.md, "gRPC's I/O engine"): ~20 % less CPU per call in grpc.aio servers and clients
#: alike; the pipeline runtime 1,020 -> 800 us per 3-stage request. A grpcio that no longer has these experiments
#: logs "Unknown experiment" once at start and runs its default.
IO_ENGINE = ("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")


def apply_grpc_defaults() -> None:
    """Put our gRPC settings in this process's environment (and so its children's): fork handlers off always, our
    I/O engine where none is set."""
    name, value = FORK_SUPPORT
    os.environ[name] = value
    name, value = IO_ENGINE
    os.environ.setdefault(name, value)
