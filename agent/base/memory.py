"""Hand freed heap memory back to the system after the agent's big one-off tasks.

glibc keeps freed memory at the top of its heap until 32 MiB of it is free, so a long-lived agent
would otherwise carry the high-water mark of its largest task (the claim connection, an old session,
an update's download and verification) for the rest of its life (bench/lifecycle_rss.py). Called
after provisioning, after each session, and after each job a handler ran.

glibc also gives each thread that meets contention an arena of its own (up to 8 per core), and
each keeps its own freed pages and fragments; awscrt's event-loop and DNS threads and the agent's
own would each hold one. The agent allocates little and rarely at once, so one arena serves it:
bench/lifecycle_rss.py measured the RSS after a whole life at 1.26x the floor with glibc's default
and 1.21x with one arena, and the peak at 1.50x and 1.33x (before the agent restarted itself in place
after provisioning and rotation, which brought the whole life to 1.09x; agent.runtime.daemon).
"""

from __future__ import annotations


def release_freed_memory() -> None:
    """malloc_trim(0) where the C library has it (glibc); elsewhere (musl) nothing to do."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_ARENA_MAX = -8  # glibc's malloc.h


def limit_malloc_arenas(arenas: int = 1) -> None:
    """mallopt(M_ARENA_MAX, n) before any thread starts; glibc only (MALLOC_ARENA_MAX in the
    environment overrides it, as documented for glibc's tunable)."""
    import os

    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass
