"""The package graph stays one-way, and no module reaches into another's private names.

base <- session <- jobs <- identity, update, defender <- inventory <- runtime <- cli, launch: a package
imports only the packages listed for it below (imports inside functions count too). A new capability
gets its own line here, and nothing below the runtime may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"

FEATURES = {"identity", "update", "defender", "inventory", "jobs", "tunneling", "local_messaging", "commands"}
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "session": {"base"},
    "jobs": {"base", "session"},
    "identity": {"base", "session", "jobs"},  # rotate-certificate is a job operation
    "update": {"base", "session", "jobs"},  # ota-update is a job operation
    "defender": {"base", "session"},
    "tunneling": {"base", "session"},
    "local_messaging": {"base", "session"},
    "commands": {"base", "session"},
    "inventory": {"base", "session", "update"},  # it reports what the update slots hold
    "runtime": {"base", "session"} | FEATURES,
    "cli": {"base", "session", "runtime"} | FEATURES,
    "launch": {"runtime", "update"},
    "__main__": {"cli"},
}


def _package(path: Path) -> str:
    rel = path.relative_to(AGENT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported agent module, names) for every import of the agent package in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "agent" or node.module.startswith("agent."):
                out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.append((node.lineno, "." * node.level + (node.module or ""), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("agent.")]
    return out


def _target(module: str, names: list[str]) -> str:
    parts = module.split(".")
    if len(parts) >= 2:
        return parts[1]
    # `from agent import x`: x is a package or module (or __version__, from agent/__init__.py)
    return names[0] if names and names[0] != "__version__" else "agent"


def test_packages_import_only_the_layers_below_them():
    files = sorted(AGENT.rglob("*.py"))
    assert len(files) > 40
    offenders = []
    for path in files:
        pkg = _package(path)
        if pkg == "__init__":
            continue
        assert pkg in ALLOWED, f"{path.relative_to(AGENT)}: package {pkg!r} has no line in ALLOWED"
        for line, module, names in _imports(path):
            where = f"{path.relative_to(AGENT)}:{line}"
            if module.startswith("."):
                offenders.append(f"{where}: relative import {module!r} (write agent.<package>.<module>)")
                continue
            target = _target(module, names)
            if target not in (pkg, "agent") and target not in ALLOWED[pkg]:
                offenders.append(f"{where}: {pkg} imports {module} ({target} is not below {pkg})")
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in sorted(AGENT.rglob("*.py")):
        me = ".".join(("agent",) + path.relative_to(AGENT).with_suffix("").parts)
        for line, module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and module != me:
                offenders.append(f"{path.relative_to(AGENT)}:{line}: {', '.join(private)} from {module}")
    assert not offenders, "\n".join(offenders)


def test_the_allowed_graph_has_no_cycle():
    seen: dict[str, int] = {}

    def visit(p: str, trail: tuple[str, ...]) -> None:
        assert p not in trail, " -> ".join(trail + (p,))
        if seen.get(p):
            return
        for q in ALLOWED.get(p, ()):
            visit(q, trail + (p,))
        seen[p] = 1

    for p in ALLOWED:
        visit(p, ())


def test_the_daemon_names_no_capability_but_the_session_identity():
    """The daemon runs whatever the registry enables; only rotation (which decides the session's
    credentials) and provisioning (before any session) are named in it."""
    src = (AGENT / "runtime" / "daemon.py").read_text()
    tree = ast.parse(src)
    named = {
        n.module.split(".")[1]
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("agent.")
    }
    assert named <= {"base", "session", "identity", "runtime", "update"}, named
    for word in ("defender", "inventory", "JobsEngine", "OtaHandler", "ota-update", "rotate-certificate"):
        assert word not in src, f"the daemon names {word!r}; it belongs in its feature package"
