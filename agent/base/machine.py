"""Write-ahead state machines as tables: every state, what runs in it, where it may go, what a restart does.

Provisioning, rotation, the OTA install, the self-update trial and the root helper's install each keep
one record in a file. The record is written first, then the effect runs; a power cut finds the record
and re-runs the effect of the state it names (every effect is idempotent). A Machine is that table,
pure data: the code that writes a record asks `move(old, new)` first, so a write the table does not
allow raises instead of leaving a record no restart knows how to finish, and a state the table lists
but no code writes is caught by a test (tests/base/test_architecture.py). docs/architecture.md prints the
tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.base.errors import AgentError

START = "(none)"  # no record yet, or the record was cleared


class IllegalMove(AgentError):
    """A state write the machine's table does not allow: a bug, never a network input."""


@dataclass(frozen=True)
class State:
    name: str
    effect: str  # what runs once the record names this state
    then: tuple[str, ...]  # where the record may go next (a state may always be written again)
    restart: str  # what a restart that finds this state does
    where: str = ""  # for machines that split work by place (rotation: "token", "connection", "prove")


class Machine:
    def __init__(self, name: str, *states: State, start: tuple[str, ...], end: str = ""):
        self.name = name
        self.end = end  # when set: any state may end the record (written as None); what that write holds
        self.states = {s.name: s for s in states}
        self.start = start  # the states a new record may begin in
        for s in states:
            unknown = set(s.then) - set(self.states) - {START}
            assert not unknown, f"{name}: {s.name} -> {unknown}: not states"

    def __contains__(self, name: object) -> bool:
        return name in self.states

    def __getitem__(self, name: str) -> State:
        return self.states[name]

    def move(self, old: str | None, new: str) -> str:
        """`new` if the table allows old -> new (old None: a new record), else IllegalMove."""
        if new not in self.states and new != START:
            raise IllegalMove(f"{self.name}: {new!r} is not a state")
        if new == START and self.end:
            return new
        if old is None or old == START:
            if new in self.start or new == START:
                return new
            raise IllegalMove(f"{self.name}: a record cannot begin in {new!r}")
        if old == new or (old in self.states and new in self.states[old].then):
            return new
        raise IllegalMove(f"{self.name}: {old!r} -> {new!r} is not a transition")

    def table(self) -> str:
        """The machine as a Markdown table (docs/architecture.md is generated from these)."""
        rows = ["| state | what runs | next | after a restart |", "|---|---|---|---|"]
        begin = ", ".join(f"`{s}`" for s in self.start)
        rows.append(f"| {START} | a new record begins in {begin} | {begin} | nothing to finish |")
        for s in self.states.values():
            nxt = ", ".join(f"`{n}`" for n in s.then) or "(final)"
            rows.append(f"| `{s.name}` | {s.effect} | {nxt} | {s.restart} |")
        if self.end:
            rows.append(f"| (any) | {self.end} | {START} | the record is gone: nothing to finish |")
        return "\n".join(rows)
