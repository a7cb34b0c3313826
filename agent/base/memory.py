"""Hand freed heap memory back to the system after the agent's big one-off tasks.

glibc keeps freed memory at the top of its heap until 32 MiB of it is free, so a long-lived agent
would otherwise carry the high-water mark of its largest task (the claim connection, an old session,
an update's download and verification) for the rest of its life (bench/lifecycle_rss.py). Called
after provisioning, after each session, and after each job a handler ran.
"""

from __future__ import annotations


def release_freed_memory() -> None:
    """malloc_trim(0) where the C library has it (glibc); elsewhere (musl) nothing to do."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
