"""The package version, in a module of its own so that everything can read it without
importing the package face (which imports the node)."""
__version__ = "0.1.0"
