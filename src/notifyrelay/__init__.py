"""notifyrelay: PostgreSQL LISTEN/NOTIFY, coalesced, to websocket clients."""

__version__ = "0.1.0"
