"""AWS IoT policies (the JSON documents in provisioning/) turned into mosquitto ACL rules.

Only what our policies use is understood: Allow statements, iot:Publish / iot:Receive /
iot:Subscribe, topic and topicfilter resources that are exact or end in `*`, and the policy
variables ${iot:Connection.Thing.ThingName} and ${iot:ClientId}. Anything else is refused
loudly rather than silently widened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROVISIONING = Path(__file__).resolve().parent.parent / "provisioning"
THING_VAR = "${iot:Connection.Thing.ThingName}"
CLIENT_VAR = "${iot:ClientId}"


@dataclass(frozen=True)
class TopicRule:
    access: str  # "read" or "write"
    topic: str  # MQTT filter; may contain THING_VAR / CLIENT_VAR


def load_policy(name: str) -> dict:
    return json.loads((PROVISIONING / name).read_text())


def rules(policy: dict) -> list[TopicRule]:
    out: list[TopicRule] = []
    for st in policy.get("Statement", []):
        if st.get("Effect") != "Allow":
            raise ValueError(f"unsupported statement effect {st.get('Effect')!r}")
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        for action in actions:
            if action == "iot:Connect":
                continue
            access = {"iot:Publish": "write", "iot:Receive": "read", "iot:Subscribe": "read"}.get(action)
            if access is None:
                raise ValueError(f"unsupported action {action!r}")
            for res in resources:
                _, _, rest = res.partition(":topic/") if ":topic/" in res else res.partition(":topicfilter/")
                if not rest:
                    raise ValueError(f"unsupported resource {res!r}")
                out.append(TopicRule(access, _to_filter(rest)))
    return out


def _to_filter(resource_topic: str) -> str:
    if "*" in resource_topic[:-1] or "+" in resource_topic or "#" in resource_topic:
        raise ValueError(f"only a trailing * is supported in {resource_topic!r}")
    if resource_topic.endswith("/*"):
        return resource_topic[:-1] + "#"
    return resource_topic


def acl_lines(
    user: str, policy_rules: list[TopicRule], thing_name: str | None, client_id: str | None = None
) -> list[str]:
    """A `user` section of a mosquitto ACL file for one certificate identity."""
    lines = [f"user {user}"]
    seen = set()
    for r in policy_rules:
        topic = r.topic
        if THING_VAR in topic:
            if not thing_name:
                continue  # the policy variable has no value: AWS denies, so do we
            topic = topic.replace(THING_VAR, thing_name)
        if CLIENT_VAR in topic:
            if not client_id:
                raise ValueError(f"{topic!r}: ${{iot:ClientId}} in a topic is not supported by the local cloud")
            topic = topic.replace(CLIENT_VAR, client_id)
        if (r.access, topic) not in seen:
            seen.add((r.access, topic))
            lines.append(f"topic {r.access} {topic}")
    return lines


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, trailing `#` the rest), as the broker does it."""
    f, t = filter_.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def permits(policy_rules: list[TopicRule], access: str, topic: str, thing_name: str | None = None) -> bool:
    """Whether the policy lets this identity `access` ("read"/"write") `topic`: the service's own check,
    built from the same rules as the broker's ACL so the two cannot disagree."""
    for r in policy_rules:
        if r.access != access:
            continue
        f = r.topic
        if THING_VAR in f:
            if not thing_name:
                continue
            f = f.replace(THING_VAR, thing_name)
        if topic_matches(f, topic):
            return True
    return False
