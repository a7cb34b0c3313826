"""The README's configuration references and the code agree, key for key, both ways."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
from pathlib import Path

from agent.commands.config import HandlerConfig
from agent.runtime import features
from agent.tunneling.config import TunnelService
from agent.update.config import OtaTargetConfig

# Every config dataclass by its class name, with the registry's bounds and parser.
agent_config = types.SimpleNamespace(
    **{c.__name__: c for c in features.SECTION_CLASSES.values()},
    OtaTargetConfig=OtaTargetConfig,
    BOUNDS=features.BOUNDS,
    parse=features.parse,
)

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(title)
    nxt = re.search(r"^## ", README[start + len(title) :], re.M)
    return README[start : start + len(title) + nxt.start()] if nxt else README[start:]


def fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_linux_config_reference_matches_the_dataclasses():
    block = re.search(r"```toml\n(.*?)```", section("## Configuration"), re.S).group(1)
    doc = tomllib.loads(block)
    sections = set(features.SECTION_CLASSES)
    assert set(doc) == sections, "README sections vs the config's sections"
    for name in sections:
        cls = features.SECTION_CLASSES[name]
        assert set(doc[name]) == fields(cls), f"[{name}]: README keys vs {cls.__name__} fields"
    targets = doc["ota"]["targets"]
    assert targets, "the README shows one [ota.targets.NAME] table"
    for t in targets.values():
        assert set(t) == fields(agent_config.OtaTargetConfig), "[ota.targets.*] keys vs OtaTargetConfig"
    services = doc["tunneling"]["services"]
    assert services, "the README shows one [tunneling.services.NAME] table"
    for svc in services.values():
        assert set(svc) == fields(TunnelService), "[tunneling.services.*] keys vs TunnelService"
    handlers = doc["commands"]["handlers"]
    assert handlers, "the README shows one [commands.handlers.NAME] table"
    for h in handlers.values():
        assert set(h) == fields(HandlerConfig), "[commands.handlers.*] keys vs HandlerConfig"
    cfg = agent_config.parse(doc, REPO / "config.toml")  # and the example itself is a valid config
    assert cfg.broker.port == 8883


def _documented_comments() -> dict[tuple[str, str], str]:
    """(table, key) -> the comment on that key's line in the README's TOML reference."""
    block = re.search(r"```toml\n(.*?)```", section("## Configuration"), re.S).group(1)
    out, table = {}, ""
    for line in block.splitlines():
        head = re.match(r"^\[([\w.]+)\]", line)
        if head:
            table = head.group(1)
            continue
        m = re.match(r"^(\w+)\s*=\s*.*?#\s*(.*)$", line)
        if m:
            out[(table, m.group(1))] = m.group(2)
    return out


def _tables_of(cls) -> list[str]:
    """The README tables a config dataclass's keys appear in."""
    if cls is agent_config.OtaTargetConfig:
        return ["ota.targets.app"]
    if cls is TunnelService:
        return ["tunneling.services.SSH"]
    if cls is HandlerConfig:
        return ["commands.handlers.logs"]
    return [name for name, c in features.SECTION_CLASSES.items() if c is cls]


RANGE = re.compile(r"^(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)\b")


def test_config_reference_documents_each_numeric_range():
    """Each number's comment starts with its range as the bounds table has it (`# 5-1200 s; ...`), numbers
    without a range (your own metric values) say `finite numbers`, and no comment shows a range the code lacks."""
    comments = _documented_comments()
    checked = set()
    for cls, bounds in agent_config.BOUNDS.items():
        for table in _tables_of(cls):
            for key, bound in bounds.items():
                comment = comments.get((table, key))
                assert comment is not None, f"[{table}] {key}: no comment in the README's reference"
                want = "finite numbers" if bound is None else bound.text()
                assert comment == want or comment.startswith(want + ";"), (
                    f"[{table}] {key}: README says {comment!r}, the bounds table {want!r}"
                )
                checked.add((table, key))
    stray = {k for k, c in comments.items() if RANGE.match(c) and k not in checked}
    assert not stray, f"README shows ranges for keys without bounds: {stray}"


def test_config_example_parses():
    doc = tomllib.loads((REPO / "systemd" / "config.example.toml").read_text())
    agent_config.parse(doc, REPO / "systemd" / "config.toml")


def test_board_config_reference_matches_the_board_agent():
    src = (REPO / "micropython" / "agent.py").read_text()
    required = set(
        re.search(r"^REQUIRED = \((.*?)\)$", src, re.M | re.S)
        .group(1)
        .replace('"', "")
        .replace(" ", "")
        .replace("\n", "")
        .split(",")
    )
    defaults = set(re.findall(r'"(\w+)":', re.search(r"^DEFAULTS = \{(.*?)\}$", src, re.M | re.S).group(1)))
    text = section("## MicroPython boards")
    example = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))
    assert set(example) == required, "README config.json example vs REQUIRED"
    optional = re.search(r"^Optional: (.*?)\n\n", text, re.M | re.S).group(1)
    documented = set(re.findall(r"`(\w+)`", optional))
    documented -= {"iot-agent-rotation", "mpy-app"}
    assert documented == defaults, "README optional keys vs DEFAULTS"
    # every key the board agent reads from its config is one of them
    read = set(re.findall(r'cfg\["(\w+)"\]', src)) | set(re.findall(r'cfg\.get\("(\w+)"', src))
    for f in ("identity.py", "ota.py"):
        t = (REPO / "micropython" / f).read_text()
        read |= set(re.findall(r'cfg\["(\w+)"\]', t)) | set(re.findall(r'cfg\.get\("(\w+)"', t))
    assert read <= required | defaults, read - (required | defaults)


def _source_text() -> str:
    """The agent's and the board's source, with implicitly concatenated string literals joined."""
    text = ""
    for d in ("agent", "micropython"):
        for f in sorted((REPO / d).rglob("*.py")):
            text += f.read_text() + "\n"
    return re.sub(r"\"\s*\n\s*f?\"", "", text)


def test_troubleshooting_lines_are_the_agents_own():
    src = _source_text()
    text = section("## Troubleshooting")
    quoted = [q.replace("\n  ", " ") for q in re.findall(r"^- `([^`]+)`", text, re.M | re.S)]
    quoted += re.findall(r"REJECTED with `([^`]+)`", text)
    assert len(quoted) >= 12, quoted
    for q in quoted:
        for frag in (f.strip() for f in q.split("…")):
            if " " in frag and len(frag) >= 8:  # a phrase; single tokens (AWS error names, paths) vary
                assert frag in src, f"README troubleshooting line not in the code: {frag!r}"
