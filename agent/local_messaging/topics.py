"""Topic names and topic filters (MQTT 5.0 section 4.7), and AWS IoT Core's extra limits on them.

Everything here is pure and total: each function takes any ``str`` (including lone surrogates, which Python
strings can hold but UTF-8 cannot) and answers without raising, except ``substitute`` whose ``ValueError`` is
its answer. Topic text comes from gateway apps and from the config file, and neither is trusted.

``covers`` decides whether an app's SUBSCRIBE stays within its allowlist, so it is written to be sound first:
when it says True, every topic the requested filter can match is matched by the allowed filter; when it cannot
tell, it says False.
"""

from __future__ import annotations

import re

MAX_TOPIC_BYTES = 256  # AWS IoT Core: a topic (or filter) is at most 256 bytes of UTF-8
MAX_TOPIC_SLASHES = 7  # AWS IoT Core: at most 7 '/' (8 levels), not counting a Basic Ingest prefix
MQTT_MAX_STRING = 0xFFFF  # MQTT 5.0 1.5.4: a UTF-8 Encoded String has a 2-byte length
SHARE_PREFIX = "$share/"  # MQTT 5.0 4.8.2: $share/{ShareName}/{filter}
_RULES_PREFIX = "$aws/rules/"  # AWS IoT Basic Ingest: $aws/rules/{rule-name}/... (matched case-insensitively)
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
# Characters that would change a filter's structure if a thing name carried them into it.
_THING_FORBIDDEN = frozenset("/+#\x00")


def _string_problem(text: str) -> str | None:
    """What makes `text` unsendable as an MQTT UTF-8 Encoded String (MQTT 5.0 1.5.4), if anything."""
    if "\x00" in text:
        return "contains U+0000"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds a lone surrogate)"
    if size > MQTT_MAX_STRING:
        return f"is {size} bytes long; MQTT allows at most {MQTT_MAX_STRING}"
    return None


def topic_name_problem(topic: str) -> str | None:
    """Why `topic` cannot be the Topic Name of a PUBLISH (MQTT 5.0 4.7.3, 3.3.2.1), or None when it can.

    A Topic Name is at least one character, carries no wildcard and no U+0000, and fits a UTF-8 string."""
    if not topic:
        return "is empty"
    if "+" in topic or "#" in topic:
        return "contains a wildcard ('+' or '#'), which only topic filters may"
    return _string_problem(topic)


def _plain_filter_problem(topic_filter: str) -> str | None:
    """Syntax of a non-shared filter: MQTT 5.0 4.7.1 (wildcards), 4.7.3 (non-empty, no U+0000)."""
    if not topic_filter:
        return "is empty"
    problem = _string_problem(topic_filter)
    if problem:
        return problem
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "uses '#' other than as the whole last level"
        if "+" in level and level != "+":
            return "uses '+' other than as a whole level"
    return None


def split_shared(topic_filter: str) -> tuple[str, str] | None:
    """(ShareName, filter) of a Shared Subscription's filter "$share/{ShareName}/{filter}", else None.

    Anything starting with "$share/" counts as an attempt at one (MQTT 5.0 4.8.2), so a malformed attempt
    gives ("", "") or a bad part rather than None: it must never be read as an ordinary "$share/..." filter."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    share, sep, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not sep:
        return share, ""
    return share, rest


def filter_syntax_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a well-formed MQTT 5 topic filter, or None. Shared subscriptions are well formed.

    This is what a SUBSCRIBE or UNSUBSCRIBE must satisfy on the wire; whether the agent serves the filter is
    `filter_problem`'s question."""
    shared = split_shared(topic_filter)
    if shared is None:
        return _plain_filter_problem(topic_filter)
    share, rest = shared
    if not share:
        return "is a shared subscription without a ShareName ($share/{ShareName}/{filter})"
    if "+" in share or "#" in share:
        return "has a wildcard in its ShareName"
    if not rest:
        return "is a shared subscription without a topic filter ($share/{ShareName}/{filter})"
    problem = _string_problem(topic_filter)  # the whole string must fit, not just the inner filter
    return problem or _plain_filter_problem(rest)


def filter_problem(topic_filter: str) -> str | None:
    """Why the agent cannot serve `topic_filter` as a subscription (or allowlist entry), or None.

    Shared subscriptions are refused: the local endpoint advertises Shared Subscription Available = 0."""
    if topic_filter.startswith(SHARE_PREFIX):
        return "shared subscriptions are not supported"
    return _plain_filter_problem(topic_filter)


def aws_topic_problem(topic: str) -> str | None:
    """Why AWS IoT Core would refuse `topic` (a topic name or filter) for its size, or None.

    AWS IoT Core's quotas: at most 256 bytes of UTF-8 and at most 7 forward slashes, neither counting the
    mandatory "$aws/rules/{rule-name}/" of a Basic Ingest topic. The prefix is recognised as aws-c-mqtt does
    (aws_mqtt5_topic_skip_aws_iot_core_uncounted_prefix: "$aws/rules/" in any case, then a non-empty rule name
    and its '/'), so the agent refuses exactly what the AWS SDKs' client-side validation refuses.
    MQTT validity is a separate question: see `topic_name_problem` and `filter_problem`."""
    counted = topic
    if topic[: len(_RULES_PREFIX)].lower() == _RULES_PREFIX:
        rule, sep, rest = topic[len(_RULES_PREFIX) :].partition("/")
        if rule and sep:
            counted = rest
    try:
        size = len(counted.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds a lone surrogate)"
    if size > MAX_TOPIC_BYTES:
        return f"is {size} bytes long; AWS IoT Core allows at most {MAX_TOPIC_BYTES}"
    slashes = counted.count("/")
    if slashes > MAX_TOPIC_SLASHES:
        return f"has {slashes} '/'; AWS IoT Core allows at most {MAX_TOPIC_SLASHES}"
    return None


def matches(topic_filter: str, topic: str) -> bool:
    """Whether the (non-shared, valid) `topic_filter` matches the Topic Name `topic` (MQTT 5.0 4.7).

    '+' matches one whole level (possibly empty), '#' the rest including the parent ("a/#" matches "a"), and a
    filter starting with a wildcard never matches a topic starting with '$' (4.7.2)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    pattern = topic_filter.split("/")
    for i, want in enumerate(pattern):
        if want == "#":
            return True
        if i >= len(levels):
            return False
        if want != "+" and want != levels[i]:
            return False
    return len(pattern) == len(levels)


def covers(allowed: str, requested: str) -> bool:
    """Whether every topic the filter `requested` can match is also matched by the filter `allowed`.

    Used to hold an app's SUBSCRIBE to its allowlist, so it errs towards False: invalid or shared filters
    are never covered. The '$' rule (4.7.2) only matters at the first level: a requested filter whose first
    level is a '$' literal can only match '$' topics, which an allowed filter starting with a wildcard does
    not match; a requested filter starting with a wildcard matches no '$' topic, so it loses nothing there."""
    if allowed.startswith(SHARE_PREFIX) or requested.startswith(SHARE_PREFIX):
        return False
    if _plain_filter_problem(allowed) or _plain_filter_problem(requested):
        return False
    want = allowed.split("/")
    have = requested.split("/")
    if have[0].startswith("$") and want[0] != have[0]:
        return False
    for i, a in enumerate(want):
        if a == "#":
            return True  # also covers topics that end at this level ("a/#" matches "a")
        if i >= len(have):
            return False  # `requested` matches topics (or, via '#', parents) with fewer levels than `allowed` needs
        r = have[i]
        if r == "#":
            return False  # `requested` matches every deeper level and the parent; only '#' in `allowed` could
        if a != "+" and a != r:
            return False  # a literal in `allowed` covers only that same literal, never '+'
    return len(want) == len(have)


def substitute(template: str, thing: str) -> str:
    """`template` with every "${thing}" replaced by the thing name; any other "${...}" is a ValueError.

    The thing name must not change the filter's shape: a '/', '+', '#' or U+0000 in it would let a name widen
    an allowlist, so such names are refused (AWS thing names cannot hold them anyway)."""
    if not thing or any(c in _THING_FORBIDDEN for c in thing):
        raise ValueError(f"thing name {thing!r} cannot be put into a topic")
    for match in _VARIABLE.finditer(template):
        if match.group(1) != "thing":
            raise ValueError(f"unknown variable {match.group(0)}")
    result = _VARIABLE.sub(lambda _m: thing, template)
    if "${" in _VARIABLE.sub("", template):
        raise ValueError(f"unterminated variable in {template!r} (write ${{thing}})")
    return result
