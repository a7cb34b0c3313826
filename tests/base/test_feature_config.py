"""Each capability validates its own config section: one bad value, one clear line, from its package.

The shared loader (agent.base.config) knows no capability's section; the registry hands it each
package's `SECTIONS`. For every feature one bad value must give exactly one problem line, the same
line whether the whole registry parses the file or only that package's sections do, and the shared
loader alone must not know the section at all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.base import config as base
from agent.base.errors import ConfigError
from agent.defender import config as defender_config
from agent.identity import config as identity_config
from agent.inventory import config as inventory_config
from agent.jobs import config as jobs_config
from agent.runtime import features
from agent.tunneling import config as tunneling_config
from agent.update import config as update_config

REPO = Path(__file__).resolve().parents[2]
BASE = {"broker": {"endpoint": "h", "ca_file": "c"}, "pkcs11": {"library": "l", "token_label": "t"}}

CASES = [
    (
        "identity",
        identity_config,
        {"identity": {"mode": "magic"}},
        "identity.mode: 'magic' is not one of claim, jitp, preprovisioned",
    ),
    (
        "provisioning",
        identity_config,
        {"provisioning": {"enabled": True, "claim_key_label": "device"}},
        "provisioning.claim_key_label: must differ from pkcs11.key_label (the device key)",
    ),
    (
        "rotation",
        identity_config,
        {"rotation": {"retry_min_s": 500, "retry_max_s": 400}},
        "rotation.retry_max_s: 400 is below rotation.retry_min_s (500); raise retry_max_s or lower retry_min_s",
    ),
    (
        "ota",
        update_config,
        {"ota": {"targets": {"app": {"directory": "d"}}}},
        "ota.code_signing_certificate: required when update targets are declared (updates are verified against it; "
        "nothing else is trusted)",
    ),
    (
        "defender",
        defender_config,
        {"defender": {"interval_s": 60}},
        "defender.interval_s: 60 is below AWS's 300 s minimum (reports would be throttled)",
    ),
    (
        "inventory",
        inventory_config,
        {"inventory": {"shadow_name": "$inventory"}},
        "inventory.shadow_name: '$inventory' is not a shadow name (1-64 letters, digits, ':', '_' or '-')",
    ),
    ("jobs", jobs_config, {"jobs": {"enabled": "yes"}}, "jobs.enabled: expected true or false, got string 'yes'"),
    (
        "tunneling",
        tunneling_config,
        {"tunneling": {"enabled": True, "services": {"SSH": {"target": "192.168.1.7:22"}}}},
        "tunneling.services.SSH.target: '192.168.1.7' is not a loopback address; a tunnel would reach other hosts "
        "through this device (set tunneling.allow_pivot_to_other_hosts = true only if that is intended)",
    ),
]


def _problems(fn) -> list[str]:
    with pytest.raises(ConfigError) as e:
        fn()
    return e.value.problems


@pytest.mark.parametrize("section, package, bad, line", CASES, ids=[c[0] for c in CASES])
def test_one_bad_value_is_one_line_from_the_features_own_package(section, package, bad, line):
    doc = {**BASE, **bad}
    assert _problems(lambda: features.parse(doc)) == [line]
    assert _problems(lambda: base.parse(doc, None, package.SECTIONS)) == [line]  # the package alone says it
    alone = _problems(lambda: base.parse(doc))  # the shared loader does not know the section
    assert len(alone) == 1 and alone[0].startswith(f"[{section}]: unknown section"), alone
    good = {**BASE, section: {}}
    assert section in features.parse(good).sections  # and the default section parses


def test_every_section_belongs_to_one_package():
    owners: dict[str, str] = {}
    for spec in features.FEATURES:
        for s in spec.sections:
            assert s.name not in owners, f"[{s.name}] declared by {owners[s.name]} and {spec.name}"
            owners[s.name] = spec.name
            assert s.cls.__module__.endswith(".config") and s.cls.__module__ != "agent.base.config", s.cls
    shared = {s.name for s in base.SHARED}
    assert not shared & set(owners)
    assert set(features.SECTION_CLASSES) == shared | set(owners)


def test_check_config_prints_the_features_line(tmp_path):
    """The same line reaches the user through `iot-agent check-config` (exit 2, nothing else said)."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[broker]\nendpoint = "h"\nca_file = "c"\n[pkcs11]\nlibrary = "l"\ntoken_label = "t"\n'
        '[inventory]\nshadow_name = "$inventory"\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert any(
        x.endswith("inventory.shadow_name: '$inventory' is not a shadow name (1-64 letters, digits, ':', '_' or '-')")
        for x in lines
    ), r.stderr
    assert len(lines) <= 2, r.stderr  # the problem, and at most a heading
