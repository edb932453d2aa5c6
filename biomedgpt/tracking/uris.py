"""What a tracking URI names on this machine: the one place that reads an SQLite store's file out of its URI."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

__all__ = ["is_sqlite_uri", "sqlite_database"]


def is_sqlite_uri(tracking_uri: str) -> bool:
    """``sqlite:...`` or SQLAlchemy's ``sqlite+driver:...`` form."""
    scheme = urllib.parse.urlsplit(tracking_uri).scheme.lower()
    return scheme.split("+", 1)[0] == "sqlite"


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of an SQLite tracking URI (``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
    percent-escapes decoded, ``?query`` dropped), or None for other URIs and in-memory databases.

    Raises ``ValueError`` for an SQLite URI without the ``///`` SQLAlchemy expects before the path.
    """
    if not is_sqlite_uri(tracking_uri):
        return None
    rest = tracking_uri.split(":", 1)[1]
    if not rest.startswith("///"):
        raise ValueError(
            f"bad SQLite URI {tracking_uri}: expected sqlite:///relative/path.db or sqlite:////abs/path.db"
        )
    location = urllib.parse.unquote(rest[3:].split("?", 1)[0])
    return None if location in ("", ":memory:") else Path(location)
