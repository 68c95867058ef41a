"""``python -m runtimes --model-dir DIR --name NAME --version N --grpc-port P --http-port Q``: serve one model."""

from __future__ import annotations

import sys

from runtimes.server import main

if __name__ == "__main__":
    sys.exit(main())
