"""Moved to agent.base.cbor (Commands use it too); kept so older imports work."""

from agent.base.cbor import dumps, loads, loads_map

__all__ = ["dumps", "loads", "loads_map"]
