"""``python -m runtimes.pipeline --spec FILE --outbound HOST:PORT --grpc-port P --http-port Q``."""

from __future__ import annotations

import sys

from runtimes.pipeline.server import main

if __name__ == "__main__":
    sys.exit(main())
