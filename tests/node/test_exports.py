"""The public surface: exactly these names, each importable (STYLE.md habit 12).

Adding a name to a package's ``__all__`` is an API decision: update this list with it.
"""
from __future__ import annotations

import importlib

import pytest

import protocol
import utesla_node

UTESLA_NODE_API = {
    "Client", "Reply", "UTeslaClient", "Handler", "Node", "NodeConfig", "load_config",
    "__version__",
}

PROTOCOL_API = {
    # the sans-IO connection
    "Connection", "Role", "Settings", "PROTOCOL_VERSION", "PROLOGUE",
    # keys
    "PrivateKey", "PublicKey", "KeyFormatError", "WeakKeyError",
    # status table and exception tree (protocol/errors.py)
    "Status", "UteslaError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "FrameError", "DecodeError", "IntegrityError", "FlowControlError", "HandshakeFailed",
    "AuthenticationFailed", "StatusError", "BadRequest", "Unauthorized", "Forbidden",
    "NotFound", "MethodNotAllowed", "RequestTimeout", "TooLarge", "InternalError",
    "Unavailable", "GatewayTimeout", "LoopDetected", "Cancelled", "error_for_status",
    # events (protocol/events.py)
    "Event", "AuthenticationRequested", "HandshakeCompleted", "RequestReceived",
    "ResponseReceived", "DataReceived", "WindowUpdated", "StreamReset", "PongReceived",
    "GoAwayReceived", "ConnectionClosed",
}


@pytest.mark.parametrize("module,expected", [(utesla_node, UTESLA_NODE_API),
                                             (protocol, PROTOCOL_API)],
                         ids=["utesla_node", "protocol"])
def test_all_is_exactly_the_documented_surface(module, expected):
    assert len(module.__all__) == len(set(module.__all__)), "duplicates in __all__"
    assert set(module.__all__) == expected


@pytest.mark.parametrize("module", [utesla_node, protocol], ids=["utesla_node", "protocol"])
def test_every_exported_name_is_importable(module):
    for name in module.__all__:
        assert getattr(module, name, None) is not None, name
    ns: dict = {}
    exec(f"from {module.__name__} import *", ns)
    assert set(module.__all__) <= set(ns) | {"__version__"}


def test_exported_objects_come_from_their_home_modules():
    from utesla_node.client import Client, Reply, UTeslaClient
    from utesla_node.config import NodeConfig, load_config
    from utesla_node.server import Node
    from utesla_node.services import Handler
    assert (utesla_node.Client, utesla_node.Reply, utesla_node.UTeslaClient) == (
        Client, Reply, UTeslaClient)
    assert (utesla_node.NodeConfig, utesla_node.load_config) == (NodeConfig, load_config)
    assert utesla_node.Node is Node and utesla_node.Handler is Handler
    assert isinstance(utesla_node.__version__, str)


def test_status_exceptions_cover_the_status_table():
    from protocol.errors import Status, StatusError, error_for_status
    for status in Status:
        if status is Status.OK:
            continue
        exc = error_for_status(status, "x")
        assert isinstance(exc, StatusError) and exc.status == status
        assert type(exc) is not StatusError, f"no class for {status!r}"
        assert type(exc).__name__ in PROTOCOL_API


def test_blog_import_line_works():
    mod = importlib.import_module("utesla_node.client")
    from utesla_node import client
    assert client is mod and hasattr(client, "UTeslaClient")

