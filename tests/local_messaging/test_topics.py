"""Topic names, filters, matching and allowlist coverage (MQTT 5.0 OASIS Standard section 4.7).

`covers` guards what an app may subscribe to, so besides the tables it gets a soundness property: whenever it
says an allowed filter covers a requested one, no topic matched by the requested filter escapes the allowed one.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.local_messaging.topics import (
    MAX_TOPIC_BYTES,
    aws_topic_problem,
    covers,
    filter_problem,
    filter_syntax_problem,
    matches,
    split_shared,
    substitute,
    topic_name_problem,
)

# (filter, topic, matches?) -- the examples of 4.7.1.2, 4.7.1.3 and 4.7.2 first, then edge cases.
MATCHES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),  # 4.7.1.2: '#' includes the parent level
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("sport/tennis/+", "sport/tennis/player1", True),  # 4.7.1.3
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),  # '+' matches an empty level
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/broker", False),  # 4.7.2: no wildcard first level for '$' topics
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("a/$x", "a/$x", True),  # '$' only matters at the start of the topic
    ("a/+", "a/$x", True),
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a/b", "A/b", False),  # case-sensitive
    ("a/#", "a", True),
    ("a/#", "ab", False),
    ("a/+/#", "a", False),
    ("a/+/#", "a/x", True),
    ("$aws/things/t/#", "$aws/things/t/shadow/update", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHES)
def test_matches(topic_filter, topic, expected):
    assert matches(topic_filter, topic) is expected


COVERS = [
    ("#", "a/b", True),
    ("#", "#", True),
    ("#", "+/x", True),
    ("#", "$aws/x", False),  # '#' does not match '$' topics, and every topic of "$aws/x" is one
    ("+/x", "+/x", True),  # neither matches '$' topics: nothing is lost
    ("+/x", "$aws/x", False),
    ("$aws/#", "$aws/things/t/x", True),
    ("$aws/#", "$aws/#", True),
    ("$aws/#", "$AWS/x", False),
    ("$aws/things/+/shadow/#", "$aws/things/t1/shadow/get", True),
    ("$aws/things/+/shadow/#", "$aws/things/+/shadow/#", True),
    ("$aws/things/t1/shadow/#", "$aws/things/+/shadow/#", False),
    ("a/#", "a", True),  # "a/#" matches the parent "a"
    ("a/#", "a/#", True),
    ("a/#", "a/+/c", True),
    ("a/+", "a/#", False),  # "a/#" matches "a" and "a/b/c"
    ("a/+", "a/+", True),
    ("a/+", "a/b", True),
    ("a/b", "a/+", False),
    ("a/+/#", "a/#", False),  # "a/#" matches "a", which "a/+/#" does not
    ("a/+/#", "a/b/#", True),
    ("a/+/#", "a/b", True),
    ("a", "a/#", False),
    ("a", "a", True),
    ("a", "b", False),
    ("+", "#", False),
    ("+", "a", True),
    ("+", "", False),  # invalid filters are never covered
    ("a/#/b", "a/x/b", False),  # nor do invalid filters cover
    ("$share/g/#", "a", False),  # shared filters are never involved
    ("#", "$share/g/a", False),
]


@pytest.mark.parametrize(("allowed", "requested", "expected"), COVERS)
def test_covers(allowed, requested, expected):
    assert covers(allowed, requested) is expected


@pytest.mark.parametrize(
    ("topic_filter", "problem"),
    [
        ("a/b", None),
        ("#", None),
        ("+", None),
        ("+/+/#", None),
        ("/", None),
        ("a//b", None),
        ("$aws/things/+/shadow/#", None),
        ("", "is empty"),
        ("a/#/b", "'#'"),
        ("a#", "'#'"),
        ("#/", "'#'"),
        ("a/b#", "'#'"),
        ("a+", "'+'"),
        ("a/+b/c", "'+'"),
        ("a\x00b", "U+0000"),
        ("a/\ud800", "surrogate"),
        ("x" * 65536, "65535"),
        ("$share/g/a", "shared subscriptions are not supported"),
        ("$share/g", "shared subscriptions are not supported"),
    ],
)
def test_filter_problem(topic_filter, problem):
    got = filter_problem(topic_filter)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


@pytest.mark.parametrize(
    ("topic_filter", "ok"),
    [
        ("$share/g/a/#", True),
        ("$share/g/+", True),
        ("$share/g//", True),  # the inner filter "/" is valid
        ("$share/g", False),  # 4.8.2: ShareName must be followed by '/' and a filter
        ("$share/g/", False),
        ("$share//a", False),  # empty ShareName
        ("$share/g+/a", False),
        ("$share/#/a", False),
        ("$share/g/a/#/b", False),
        ("$share", True),  # not a shared subscription: an ordinary one-level filter
        ("$sharex/g/a", True),
    ],
)
def test_filter_syntax_accepts_well_formed_shared_subscriptions(topic_filter, ok):
    assert (filter_syntax_problem(topic_filter) is None) is ok


def test_split_shared():
    assert split_shared("$share/g/a/b") == ("g", "a/b")
    assert split_shared("$share/g") == ("g", "")
    assert split_shared("a/b") is None


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("a/b", None),
        ("/", None),
        ("$aws/things/t/shadow/update", None),
        ("é/ü", None),
        ("", "is empty"),
        ("a/+", "wildcard"),
        ("a/#", "wildcard"),
        ("a+b", "wildcard"),
        ("a\x00", "U+0000"),
        ("\udfff", "surrogate"),
        ("x" * 65535, None),
        ("x" * 65536, "65535"),
        ("é" * 32768, "65535"),  # 65536 bytes of UTF-8
    ],
)
def test_topic_name_problem(topic, problem):
    got = topic_name_problem(topic)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("a/b/c/d/e/f/g/h", None),  # 7 slashes
        ("a/b/c/d/e/f/g/h/i", "8 '/'"),
        ("$aws/rules/r1/a/b/c/d/e/f/g/h", None),  # Basic Ingest: the first 3 slashes do not count
        ("$AWS/Rules/r1/a/b/c/d/e/f/g/h", None),  # ... matched case-insensitively
        ("$aws/rules/r1/a/b/c/d/e/f/g/h/i", "8 '/'"),
        ("$aws/rules//a/b/c/d/e/f", "8 '/'"),  # no rule name: no prefix to skip
        ("$aws/things/t/shadow/name/n/update/accepted", None),
        ("$aws/things/t/shadow/name/n/update/accepted/x", "8 '/'"),
        ("x" * MAX_TOPIC_BYTES, None),
        ("x" * (MAX_TOPIC_BYTES + 1), "257 bytes"),
        ("é" * 129, "258 bytes"),
        ("$aws/rules/r/" + "x" * MAX_TOPIC_BYTES, None),  # as aws-c-mqtt counts it
        ("\ud800", "surrogate"),
    ],
)
def test_aws_topic_problem(topic, problem):
    got = aws_topic_problem(topic)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$aws/things/${thing}/shadow/#", "$aws/things/t-1/shadow/#"),
        ("${thing}/${thing}", "t-1/t-1"),
        ("plain/topic", "plain/topic"),
        ("$a{thing}/$", "$a{thing}/$"),
        ("a/${thing}x", "a/t-1x"),
    ],
)
def test_substitute(template, expected):
    assert substitute(template, "t-1") == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("a/${thingName}", "unknown variable ${thingName}"),
        ("a/${}", "unknown variable ${}"),
        ("${THING}", "unknown variable ${THING}"),
        ("a/${thing", "unterminated"),
    ],
)
def test_substitute_refuses_unknown_variables(template, message):
    with pytest.raises(ValueError) as e:
        substitute(template, "t")
    assert message in str(e.value)


@pytest.mark.parametrize("thing", ["", "a/b", "a+", "#", "a\x00"])
def test_substitute_refuses_thing_names_that_change_a_filter(thing):
    with pytest.raises(ValueError):
        substitute("x/${thing}/y", thing)


# ---- covers is sound: checked against matches over a small universe ----

LEVELS = ["a", "b", "$x", "+", "#", ""]
TOPIC_LEVELS = ["a", "b", "$x", "c", ""]


@st.composite
def filters(draw):
    levels = draw(st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4))
    if "#" in levels:  # '#' only last: cut after the first one
        levels = levels[: levels.index("#") + 1]
    return "/".join(levels)


topics = st.lists(st.sampled_from(TOPIC_LEVELS), min_size=1, max_size=5).map("/".join)


@settings(max_examples=1500, deadline=None, derandomize=True, database=None)
@given(filters(), filters(), topics)
def test_covers_is_sound(allowed, requested, topic):
    if covers(allowed, requested) and matches(requested, topic):
        assert matches(allowed, topic), (allowed, requested, topic)


def _universe() -> list[str]:
    out = [""]
    frontier = [""]
    for depth in range(4):
        frontier = [f"{t}/{lvl}" if depth else lvl for t in frontier for lvl in TOPIC_LEVELS]
        out += frontier
    return [t for t in out if t]


UNIVERSE = _universe()


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(filters(), filters())
def test_covers_agrees_with_matching_over_a_universe(allowed, requested):
    """Over every topic of up to 4 levels: sound always, and exact when no topic deeper than 4 can differ."""
    escaped = [t for t in UNIVERSE if matches(requested, t) and not matches(allowed, t)]
    if covers(allowed, requested):
        assert not escaped, (allowed, requested, escaped[:3])
    elif "#" not in requested and "#" not in allowed:
        # Without '#', both filters match topics of exactly their own depth (<= 4): the universe is exhaustive,
        # so covers must not refuse what matching shows to be covered (it is complete, not only sound).
        assert escaped or not any(matches(requested, t) for t in UNIVERSE), (allowed, requested)
