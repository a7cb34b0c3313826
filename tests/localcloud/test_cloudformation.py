"""provisioning/fleet-stack.yaml: lints clean, passes checkov, and says what the JSON files and the agent say."""

from __future__ import annotations

import fcntl
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROV = ROOT / "provisioning"
STACK = PROV / "fleet-stack.yaml"
BIN = Path(sys.executable).parent

# What the agent reports in a custom metric -> CloudFormation's AWS::IoT::CustomMetric MetricType.
METRIC_TYPES = {
    "number": "number",
    "number_list": "number-list",
    "string_list": "string-list",
    "ip_list": "ip-address-list",
}


# cfn-lint and checkov live in their own virtualenv under .deps (CI may cache it): checkov pins old
# versions of common packages (packaging<24), which must not leak into the agent's test environment.
TOOLS = ROOT / ".deps" / "cfn-tools"
TOOL_VERSIONS = ["cfn-lint==1.58.0", "checkov==3.3.30"]


@functools.cache
def tools() -> Path:
    """Install the tools once, whichever xdist worker asks first.

    Two modules use them and run in different workers: without the lock one worker's `venv --clear`
    wiped the other's half-finished install (CI saw `No module named 'cfnlint'`). The marker is
    written last, so an install cut short is redone rather than trusted.
    """
    marker = TOOLS / "installed.txt"
    TOOLS.parent.mkdir(parents=True, exist_ok=True)
    with open(TOOLS.parent / "cfn-tools.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        ready = marker.exists() and marker.read_text() == " ".join(TOOL_VERSIONS)
        if not (ready and (TOOLS / "bin" / "cfn-lint").exists() and (TOOLS / "bin" / "checkov").exists()):
            marker.unlink(missing_ok=True)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(TOOLS)], check=True, timeout=120)
            r = subprocess.run(
                [str(TOOLS / "bin" / "python"), "-m", "pip", "install", "-q", *TOOL_VERSIONS],
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            marker.write_text(" ".join(TOOL_VERSIONS))
    return TOOLS / "bin"


def tool(name: str) -> str:
    return str(tools() / name)


@functools.cache
def _stack_json() -> str:
    r = subprocess.run(
        [
            str(tools() / "python"),
            "-c",
            "import json, sys\nfrom cfnlint.decode import decode\n"
            "t, m = decode(sys.argv[1])\n"
            "print(json.dumps({'template': t, 'errors': [str(x) for x in m or []]}, default=str))",
            str(STACK),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def load_stack() -> dict:
    """The template as CloudFormation reads it (cfn-lint's decoder, intrinsic tags included)."""
    doc = json.loads(_stack_json())
    assert not doc["errors"], doc["errors"]
    return doc["template"]


def resources_of(template: dict, rtype: str) -> dict[str, dict]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == rtype}


def resolve(value, params: dict[str, str]):
    """Fn::Sub / Ref with parameter defaults, AWS::Region and AWS::AccountId as '*', `${!x}` as the literal `${x}`."""
    pseudo = {"AWS::Region": "*", "AWS::AccountId": "*", "AWS::Partition": "aws"}

    def sub(text: str) -> str:
        def one(m: re.Match) -> str:
            if m.group(1):
                return "${" + m.group(2) + "}"
            name = m.group(2)
            if name in pseudo:
                return pseudo[name]
            if name not in params:
                raise AssertionError(f"unresolvable ${{{name}}} in {text!r}")
            return params[name]

        return re.sub(r"\$\{(!?)([^}]+)\}", one, text)

    if isinstance(value, dict):
        if set(value) == {"Fn::Sub"}:
            assert isinstance(value["Fn::Sub"], str), "only the one-argument Fn::Sub is resolved here"
            return sub(value["Fn::Sub"])
        if set(value) == {"Ref"}:
            name = value["Ref"]
            return pseudo.get(name) or params[name]
        return {k: resolve(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, params) for v in value]
    return value


def defaults(template: dict) -> dict[str, str]:
    return {k: str(p["Default"]) for k, p in template["Parameters"].items() if "Default" in p}


def as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def normal_statements(doc: dict) -> list[dict]:
    out = []
    for st in doc["Statement"]:
        st = dict(st)
        for key in ("Action", "Resource"):
            # Region and account are '*' on both sides after resolve(); any arn:aws:iot:<r>:<a>: prefix compares equal.
            st[key] = [re.sub(r"^arn:aws:iot:[^:]*:[^:]*:", "arn:aws:iot:*:*:", v) for v in as_list(st[key])]
        out.append(st)
    return out


def test_cfn_lint_is_clean():
    r = subprocess.run([tool("cfn-lint"), str(STACK)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_checkov_has_no_failed_checks():
    r = subprocess.run(
        [
            tool("checkov"),
            "-f",
            str(STACK),
            "--framework",
            "cloudformation",
            "--compact",
            "--quiet",
            "-o",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = json.loads(r.stdout)
    reports = out if isinstance(out, list) else [out]
    assert [rep["check_type"] for rep in reports] == ["cloudformation"], r.stdout[:2000]
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0 and summary["resource_count"] > 10, summary
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in reports[0]["results"]["failed_checks"]]
    assert not failed and summary["failed"] == 0 and r.returncode == 0, failed
    # Every suppression carries a written reason.
    for name, res in load_stack()["Resources"].items():
        for skip in res.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert len(str(skip.get("comment", "")).strip()) > 20, (name, skip)


@pytest.mark.parametrize(
    "resource,policy_file",
    [
        ("ClaimPolicy", "claim-policy.json"),
        ("DevicePolicy", "device-policy.json"),
        ("QuarantinePolicy", "quarantine-policy.json"),
    ],
)
def test_policies_equal_the_json_files(resource, policy_file):
    template = load_stack()
    res = template["Resources"][resource]
    assert res["Type"] == "AWS::IoT::Policy"
    stack_doc = resolve(res["Properties"]["PolicyDocument"], defaults(template))
    file_doc = json.loads((PROV / policy_file).read_text())
    assert stack_doc["Version"] == file_doc["Version"]
    assert normal_statements(stack_doc) == normal_statements(file_doc)


def test_policy_names_and_provisioning_template_match_the_files():
    template = load_stack()
    params = defaults(template)
    pols = {r["Properties"]["PolicyName"]["Ref"] for r in resources_of(template, "AWS::IoT::Policy").values()}
    assert pols == {"ClaimPolicyName", "DevicePolicyName", "QuarantinePolicyName"}

    (prov,) = resources_of(template, "AWS::IoT::ProvisioningTemplate").values()
    props = prov["Properties"]
    assert resolve(props["TemplateName"], params) == "iot-agent-fleet"  # claim-policy.json's topics name it
    assert props["TemplateType"] == "FLEET_PROVISIONING" and props["Enabled"] is True
    assert props["ProvisioningRoleArn"] == {"Fn::GetAtt": ["ProvisioningRole", "Arn"]}
    role = template["Resources"]["ProvisioningRole"]["Properties"]
    assert [resolve(a, params) for a in role["ManagedPolicyArns"]] == [
        "arn:aws:iam::aws:policy/service-role/AWSIoTThingsRegistration"
    ]

    body = json.loads(resolve(props["TemplateBody"], params))
    thing = body["Resources"]["thing"]["Properties"]
    # The stack's additions: the thing joins the fleet's thing type and thing group (the security profile's target).
    assert thing.pop("ThingTypeName") == params["ThingTypeName"]
    assert thing.pop("ThingGroups") == [params["FleetGroupName"]]
    assert body == json.loads((PROV / "fleet-template.json").read_text())


def agent_custom_metrics(tmp_path) -> dict[str, str]:
    """name -> MetricType, from the agent's own collector with a certificate present (so every built-in shows)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from agent.defender.config import DefenderConfig
    from agent.defender.reporter import Collector

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=90))
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "device.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    reported = Collector(DefenderConfig(), tmp_path, pem).custom()
    assert "cert_days_to_expiry" in reported  # the certificate above was read
    out = {}
    for metric, value in reported.items():
        (kind,) = value.keys()
        out[metric] = METRIC_TYPES[kind]
    return out


def test_custom_metrics_are_what_the_agent_reports(tmp_path):
    agent = agent_custom_metrics(tmp_path)
    template = load_stack()

    defined = {
        r["Properties"]["MetricName"]: r["Properties"]["MetricType"]
        for r in resources_of(template, "AWS::IoT::CustomMetric").values()
    }
    assert defined == agent

    (profile,) = resources_of(template, "AWS::IoT::SecurityProfile").values()
    behaviors = profile["Properties"]["Behaviors"]
    in_profile = {b["Metric"] for b in behaviors if not b["Metric"].startswith("aws:")}
    assert in_profile == set(agent)
    # The profile is created after the metrics it names.
    by_name = {r["Properties"]["MetricName"]: k for k, r in resources_of(template, "AWS::IoT::CustomMetric").items()}
    assert {by_name[m] for m in in_profile} <= set(profile["DependsOn"])
    # And it watches the standard device-side metrics too.
    device_side = {b["Metric"] for b in behaviors if b["Metric"].startswith("aws:")}
    assert {"aws:num-listening-tcp-ports", "aws:num-established-tcp-connections", "aws:all-bytes-out"} <= device_side
