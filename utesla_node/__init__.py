"""utesla-node: join several machines' services into one secure network.

Public surface (guarded by tests/node/test_exports.py)::

    from utesla_node import Client, Reply, Handler, Node, NodeConfig, load_config
"""
from .version import __version__  # noqa: E402

from .client import Client, Reply, UTeslaClient  # noqa: E402
from .config import NodeConfig, load_config  # noqa: E402
from .server import Node  # noqa: E402
from .services import Handler  # noqa: E402

__all__ = ["Client", "Reply", "UTeslaClient", "Handler", "Node", "NodeConfig", "load_config",
           "__version__"]
