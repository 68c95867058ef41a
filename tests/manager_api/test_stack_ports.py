"""`hydro up`'s ports are never picked by its children: the manager's deployer picks ports for every runtime and
sidecar while the ingress's listener port, for one, is bound only once its LDS arrives.

The stack is built (its ports chosen), not started: a real child process with the stack's environment is offered
each of the stack's ports by its port picker, and must refuse them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from manager_api.stack import Stack, StackConfig

#: Run in the child: offer each port of argv[1] first, and print what free_port() picked each time.
PICKER = """
import json, random, sys
from manager_api import ports

class Offer(random.Random):
    def __init__(self, port):
        super().__init__()
        self.port = port
    def randrange(self, start, stop=None, step=1):
        first, self.port = self.port, None
        return first if first is not None else super().randrange(start, stop, step)

picked = []
for port in json.loads(sys.argv[1]):
    ports._random = Offer(port)
    picked.append(ports.free_port())
print(json.dumps(picked))
"""


def test_the_children_of_hydro_up_never_pick_its_ports(tmp_path: Path) -> None:
    # Every port picked, as tests (and `--ingress-port 0`) do: they then come from the deployer's pick window.
    config = StackConfig(data_dir=tmp_path, ingress_port=0, api_port=0, xds_port=0, xds_metrics_port=0, etcd_port=0)
    stack = Stack(config)
    named = {
        "ingress": stack.ingress_port,
        "api": stack.api_port,
        "xds": stack.xds_port,
        "xds metrics": stack.xds_metrics_port,
        "etcd": stack.etcd.client_port,
        "etcd peer": stack.etcd.peer_port,
        "ingress admin": stack.ingress_admin_port,
    }
    offered = list(named.values())
    done = subprocess.run(
        [sys.executable, "-c", PICKER, json.dumps(offered)],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    picked = json.loads(done.stdout)
    taken = {name: port for (name, port), got in zip(named.items(), picked, strict=True) if got == port}
    assert taken == {}, f"a child of the stack picked the stack's own ports: {taken}"
