"""mediad: a small, fast ASGI media file service."""

__version__ = "0.1.0"
