"""Command-line interfaces: ``utesla-node`` (node.py) and ``utesla-cli`` (admin.py)."""
