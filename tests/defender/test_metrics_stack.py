"""provisioning/fleet-stack.yaml's optional metrics rule (metrics without Device Defender Detect): created only
with MetricsTopicRule=cloudwatch-logs, selects what the agent publishes by default, and its role may only write
to its own log group. cfn-lint and checkov run with the rule switched on (by default its resources are off, and
checkov leaves out resources whose condition is false)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from agent.defender.config import DefenderConfig

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "provisioning" / "fleet-stack.yaml"
RULE_RESOURCES = {
    "MetricsLogGroup": "AWS::Logs::LogGroup",
    "MetricsLogsRole": "AWS::IAM::Role",
    "MetricsLogsRule": "AWS::IoT::TopicRule",
}


def _cfn():
    """tests/localcloud/test_cloudformation.py's tools (cfn-lint and checkov in .deps) and template loader."""
    path = ROOT / "tests" / "localcloud" / "test_cloudformation.py"
    spec = importlib.util.spec_from_file_location("_fleet_stack_tools", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cfn():
    return _cfn()


@pytest.fixture(scope="module")
def template(cfn) -> dict:
    return cfn.load_stack()


def switched_on(tmp_path: Path) -> Path:
    text = STACK.read_text()
    anchor = "  MetricsTopicRule:\n    Type: String\n    Default: none\n"
    assert text.count(anchor) == 1
    out = tmp_path / "fleet-stack-metrics.yaml"
    out.write_text(text.replace(anchor, anchor.replace("Default: none", "Default: cloudwatch-logs")))
    return out


def test_the_rule_exists_only_when_asked_for(template):
    p = template["Parameters"]["MetricsTopicRule"]
    assert p["Default"] == "none" and set(p["AllowedValues"]) == {"none", "cloudwatch-logs"}
    assert template["Conditions"]["CreateMetricsLogsRule"] == {
        "Fn::Equals": [{"Ref": "MetricsTopicRule"}, "cloudwatch-logs"]
    }
    res = template["Resources"]
    for name, rtype in RULE_RESOURCES.items():
        assert res[name]["Type"] == rtype and res[name]["Condition"] == "CreateMetricsLogsRule", name
    assert template["Outputs"]["MetricsLogGroupName"]["Condition"] == "CreateMetricsLogsRule"
    # Nothing else depends on the condition's resources (the stack deploys with the default "none").
    others = json.dumps({k: v for k, v in res.items() if k not in RULE_RESOURCES})
    assert not any(name in others for name in RULE_RESOURCES)


def test_the_rule_selects_the_agents_default_topic_into_its_log_group(template):
    props = template["Resources"]["MetricsLogsRule"]["Properties"]["TopicRulePayload"]
    assert props["AwsIotSqlVersion"] == "2016-03-23" and props["RuleDisabled"] is False
    filter_ = DefenderConfig().topic.replace("${thing}", "+")
    assert props["Sql"] == f"SELECT *, topic(2) AS thing_name FROM '{filter_}'"
    assert filter_.split("/").index("+") == 1  # topic(2) is the thing name
    (action,) = props["Actions"]
    assert action == {
        "CloudwatchLogs": {
            "LogGroupName": {"Ref": "MetricsLogGroup"},
            "RoleArn": {"Fn::GetAtt": ["MetricsLogsRole", "Arn"]},
        }
    }
    group = template["Resources"]["MetricsLogGroup"]["Properties"]
    assert group["RetentionInDays"] == {"Ref": "MetricsLogRetentionDays"}


def test_the_role_may_only_write_its_log_group(template):
    role = template["Resources"]["MetricsLogsRole"]["Properties"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "iot.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
    assert "ManagedPolicyArns" not in role
    (policy,) = role["Policies"]
    (stmt,) = policy["PolicyDocument"]["Statement"]
    assert stmt["Effect"] == "Allow" and sorted(stmt["Action"]) == ["logs:CreateLogStream", "logs:PutLogEvents"]
    assert stmt["Resource"] == {"Fn::GetAtt": ["MetricsLogGroup", "Arn"]}


def test_the_device_policy_allows_the_default_topic():
    policy = json.loads((ROOT / "provisioning" / "device-policy.json").read_text())
    publish = [
        r
        for st in policy["Statement"]
        if "iot:Publish" in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
        for r in (st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]])
    ]
    topic = DefenderConfig().topic.replace("${thing}", "${iot:Connection.Thing.ThingName}")
    assert any(r.endswith(":topic/" + topic.rsplit("/", 1)[0] + "/*") for r in publish), publish


def test_lint_and_checkov_are_clean_with_the_rule_on(cfn, tmp_path):
    on = switched_on(tmp_path)
    r = subprocess.run([cfn.tool("cfn-lint"), str(on)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr
    r = subprocess.run(
        [
            cfn.tool("checkov"),
            "-f",
            str(on),
            "--framework",
            "cloudformation",
            "--compact",
            "-o",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = json.loads(r.stdout)
    (report,) = out if isinstance(out, list) else [out]
    results = report["results"]
    assert not results["failed_checks"] and r.returncode == 0, [c["check_id"] for c in results["failed_checks"]]
    checked = {c["resource"].split(".")[-1] for c in results["passed_checks"] + results["skipped_checks"]}
    assert set(RULE_RESOURCES) - {"MetricsLogsRule"} <= checked  # checkov did look at them
