"""refreshd: keeps OAuth credentials fresh ahead of expiry.

A refresh token is never sent twice: every refresh runs under a
per-credential lease, records a spend intent before the HTTP request
leaves, and commits the new tokens with one atomic Redis script.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
