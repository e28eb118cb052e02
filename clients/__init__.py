"""vpt-serve clients: the Python SDK (`Client`, `AsyncClient`) and the `vpt` CLI."""

from clients.client import AsyncClient, Client, RetryPolicy
from clients.errors import APIError, VPTError, parse_error

__all__ = ["APIError", "AsyncClient", "Client", "RetryPolicy", "VPTError", "parse_error"]
