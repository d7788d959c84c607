"""``ray start`` for a Ray cluster that stays on 127.0.0.1 (tests, benchmarks, one machine).

Ray replaces a loopback ``--node-ip-address`` by the machine's network address on Linux, so a
"local" cluster would listen and connect on that address. This runs Ray's own CLI with the node
address pinned to 127.0.0.1; drivers connecting to such a cluster set
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before importing ray (see :data:`DRIVER_ENV`), which makes
them resolve their own address to 127.0.0.1 as well.

    python -m insitu.engines.ray_loopback start --head --node-ip-address=127.0.0.1 --port=6379 ...
    python -m insitu.engines.ray_loopback start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 ...
"""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"
DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Environment for a driver process of a loopback cluster (set before ``import ray``)."""


def main(argv: list[str]) -> int:
    """Ray's CLI with every node-address lookup answering 127.0.0.1."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # a second node may join (Ray's multi-node switch)
    from ray._private import services
    from ray.scripts.scripts import main as ray_main

    services.node_ip_address_from_perspective = lambda *args, **kwargs: LOOPBACK
    sys.argv = ["ray", *argv]
    return int(ray_main() or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
