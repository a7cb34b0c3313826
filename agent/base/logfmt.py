"""Log lines that text from the network cannot forge.

A job's `operation`, an error message quoting a document, a topic: anything the agent logs may carry
text it did not write. `SafeFormatter` escapes control characters in every record's message (C0 and
C1 controls, DEL, the Unicode line and paragraph separators, and unpaired surrogates, which a UTF-8
stream cannot write) and bounds its length, so one record is one line whatever its arguments hold.
A traceback from `log.exception` is left as the multi-line text it is: it is ours, not the message.
Backslashes are not escaped: an escaped newline and a literal backslash-n read alike, but neither
can start a line.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MAX_MESSAGE_CHARS = 4096

# C0 controls (tab included), DEL and C1 controls (NEL among them), LINE/PARAGRAPH SEPARATOR, surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(m: re.Match[str]) -> str:
    c = m.group(0)
    named = _NAMED.get(c)
    if named:
        return named
    o = ord(c)
    return f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}"


def escape(text: str, limit: int | None = None) -> str:
    """`text` with every unsafe character written as a backslash escape; at most `limit` characters
    (then ending in a mark that says how much was cut)."""
    if limit is not None and len(text) > limit:
        cut = len(text) - limit
        head = _UNSAFE.sub(_escape_one, text[:limit])[:limit]
        return f"{head}... [{cut} more characters]"
    out = _UNSAFE.sub(_escape_one, text)
    if limit is not None and len(out) > limit:
        return f"{out[:limit]}... [escaped text cut at {limit} characters]"
    return out


class SafeFormatter(logging.Formatter):
    """A logging.Formatter whose message part is always one bounded line (see the module's doc)."""

    def __init__(self, *args: Any, max_message_chars: int = MAX_MESSAGE_CHARS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_message_chars = max_message_chars

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        safe = escape(message, self.max_message_chars)
        if safe == message:
            return super().format(record)
        # Format a copy: the record itself goes on to other handlers unchanged.
        copy = logging.makeLogRecord(record.__dict__)
        copy.msg, copy.args = safe, None
        return super().format(copy)


def basic_config(*, level: int, format: str, datefmt: str | None = None, stream: Any = None) -> None:
    """logging.basicConfig with a SafeFormatter on its one stream handler (stderr unless `stream`)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter(format, datefmt=datefmt))
    logging.basicConfig(level=level, handlers=[handler])
