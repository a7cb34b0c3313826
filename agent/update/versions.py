"""Release versions: one spelling per version, so a release that failed cannot come back under another.

A version is MAJOR.MINOR.PATCH in ASCII digits without leading zeros, each part at most 9 digits:
"1.0.0", "10.2.33". Anything else is refused, not normalised: "6.0", "06.0.0", "6.0.0.0", "٦.0.0"
(Arabic-Indic digits, which str.isdigit() and \\d accept), "9.0.0\\n", " 1.0.0". Because each version has
exactly one spelling, comparing strings for equality and comparing keys for order agree, and the
record of broken releases cannot be sidestepped.
"""

from __future__ import annotations

import re

_RE = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})", re.ASCII)


class VersionError(ValueError):
    """Not a canonical version; str() says why, for a job's statusDetails."""


def parse_version(text: object) -> tuple[int, int, int]:
    """The comparable key of a canonical version; VersionError for anything else."""
    if not isinstance(text, str):
        raise VersionError("version must be a string such as 1.2.3")
    if len(text) > 29 or not _RE.fullmatch(text):
        shown = text[:20].encode("ascii", "backslashreplace").decode()
        raise VersionError(f"version {shown!r} is not MAJOR.MINOR.PATCH in ASCII digits without leading zeros")
    a, b, c = text.split(".")
    return int(a), int(b), int(c)


def is_version(text: object) -> bool:
    try:
        parse_version(text)
        return True
    except VersionError:
        return False


def installed_key(text: str) -> tuple[int, ...]:
    """An installed version's order key: canonical versions, and the dotted numbers (1-4 parts) that
    older agents accepted, so what is on a device stays comparable. Only for what is already installed:
    a new release must pass parse_version. Keys are padded to 4 parts so both kinds compare."""
    try:
        return parse_version(text) + (0,)
    except VersionError:
        parts = text.split(".") if isinstance(text, str) else []
        if not 1 <= len(parts) <= 4 or not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
            raise VersionError(
                f"the installed version {str(text)[:20]!r} cannot be compared; reinstall the target"
            ) from None
        return tuple(int(p) for p in parts) + (0,) * (4 - len(parts))
