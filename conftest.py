"""Root conftest: its presence puts the project root on ``sys.path`` for every test."""
