"""provisioning/aws_setup.py against AWS's service model (botocore Stubber): every call's parameters
are validated by botocore against the real API definitions; nothing leaves the machine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("aws_setup", REPO / "provisioning" / "aws_setup.py")
aws_setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aws_setup)

ROLE_ARN = "arn:aws:iam::123456789012:role/iot-agent-provisioning"
CERT_ARN = "arn:aws:iot:eu-west-1:123456789012:cert/" + "a" * 64


def clients():
    kw = dict(region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    return boto3.client("iot", **kw), boto3.client("iam", **kw)


def role(name="iot-agent-provisioning"):
    return {
        "Role": {
            "Path": "/",
            "RoleName": name,
            "RoleId": "AROAEXAMPLEEXAMPLE01",
            "Arn": ROLE_ARN,
            "CreateDate": "2026-01-01T00:00:00Z",
        }
    }


@pytest.mark.parametrize("already_there", [False, True])
def test_setup_calls_match_the_aws_service_model(tmp_path, already_there):
    iot, iam = clients()
    with Stubber(iot) as s_iot, Stubber(iam) as s_iam:
        if already_there:
            s_iam.add_client_error("create_role", "EntityAlreadyExists", http_status_code=409)
            s_iam.add_response("get_role", role(), {"RoleName": "iot-agent-provisioning"})
        else:
            s_iam.add_response(
                "create_role",
                role(),
                {"RoleName": "iot-agent-provisioning", "AssumeRolePolicyDocument": ANY, "Description": ANY},
            )
        s_iam.add_response(
            "attach_role_policy", {}, {"RoleName": "iot-agent-provisioning", "PolicyArn": aws_setup.REGISTRATION_POLICY}
        )
        for name in ("iot-agent-device", "iot-agent-claim"):
            if already_there:
                s_iot.add_client_error("create_policy", "ResourceAlreadyExistsException", http_status_code=409)
            else:
                s_iot.add_response("create_policy", {"policyName": name}, {"policyName": name, "policyDocument": ANY})
        if already_there:
            s_iot.add_client_error(
                "create_provisioning_template", "ResourceAlreadyExistsException", http_status_code=409
            )
            s_iot.add_response(
                "update_provisioning_template",
                {},
                {"templateName": "iot-agent-fleet", "provisioningRoleArn": ROLE_ARN, "enabled": True},
            )
        else:
            s_iot.add_response(
                "create_provisioning_template",
                {"templateName": "iot-agent-fleet"},
                {
                    "templateName": "iot-agent-fleet",
                    "templateBody": ANY,
                    "provisioningRoleArn": ROLE_ARN,
                    "enabled": True,
                    "description": ANY,
                },
            )
        s_iot.add_response(
            "create_certificate_from_csr",
            {
                "certificateArn": CERT_ARN,
                "certificateId": "a" * 64,
                "certificatePem": "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
            },
            {"certificateSigningRequest": "CSR", "setAsActive": True},
        )
        s_iot.add_response("attach_policy", {}, {"policyName": "iot-agent-claim", "target": CERT_ARN})
        s_iot.add_response(
            "describe_endpoint",
            {"endpointAddress": "abc123-ats.iot.eu-west-1.amazonaws.com"},
            {"endpointType": "iot:Data-ATS"},
        )
        result = aws_setup.setup(
            iot,
            iam,
            template="iot-agent-fleet",
            device_policy="iot-agent-device",
            claim_policy="iot-agent-claim",
            role="iot-agent-provisioning",
            claim_csr="CSR",
            out=tmp_path,
        )
        s_iot.assert_no_pending_responses()
        s_iam.assert_no_pending_responses()
    assert result["endpoint"] == "abc123-ats.iot.eu-west-1.amazonaws.com"
    assert (tmp_path / "claim.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    import tomllib

    cfg = tomllib.loads((tmp_path / "config.toml").read_text())
    assert cfg["broker"]["endpoint"] == result["endpoint"] and cfg["provisioning"]["enabled"] is True


def test_template_body_references_the_device_policy_and_is_valid_json():
    body = aws_setup.template_body("my-device-policy")
    assert body["Resources"]["policy"]["Properties"]["PolicyName"] == "my-device-policy"
    assert body["Resources"]["certificate"]["Properties"]["Status"] == "ACTIVE"
    json.dumps(body)


def test_setup_from_the_fleet_stack_reads_its_outputs(tmp_path):
    kw = dict(region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    iot, cfn = boto3.client("iot", **kw), boto3.client("cloudformation", **kw)
    outputs = {
        "ProvisioningTemplateName": "fleet-7",
        "ClaimPolicyName": "fleet-7-claim",
        "DevicePolicyName": "d",
        "OtaBucketName": "fleet-7-ota",
        "SigningProfileName": "fleet7signer",
    }
    with Stubber(iot) as s_iot, Stubber(cfn) as s_cfn:
        s_cfn.add_response(
            "describe_stacks",
            {
                "Stacks": [
                    {
                        "StackName": "fleet-7",
                        "CreationTime": "2026-01-01T00:00:00Z",
                        "StackStatus": "CREATE_COMPLETE",
                        "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()],
                    }
                ]
            },
            {"StackName": "fleet-7"},
        )
        s_iot.add_response(
            "create_certificate_from_csr",
            {
                "certificateArn": CERT_ARN,
                "certificateId": "a" * 64,
                "certificatePem": "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
            },
            {"certificateSigningRequest": "CSR", "setAsActive": True},
        )
        s_iot.add_response("attach_policy", {}, {"policyName": "fleet-7-claim", "target": CERT_ARN})
        s_iot.add_response(
            "describe_endpoint",
            {"endpointAddress": "abc123-ats.iot.eu-west-1.amazonaws.com"},
            {"endpointType": "iot:Data-ATS"},
        )
        result = aws_setup.setup_from_stack(iot, cfn, stack="fleet-7", claim_csr="CSR", out=tmp_path)
        s_iot.assert_no_pending_responses()
        s_cfn.assert_no_pending_responses()
    assert result["template"] == "fleet-7" and result["OtaBucketName"] == "fleet-7-ota"
    import tomllib

    cfg = tomllib.loads((tmp_path / "config.toml").read_text())
    assert cfg["provisioning"]["template_name"] == "fleet-7"
    # the stack's outputs are the ones this script reads
    stack = (REPO / "provisioning" / "fleet-stack.yaml").read_text()
    for key in outputs:
        assert f"\n  {key}:\n" in stack, key


def test_setup_from_a_stack_that_is_not_ready_says_so(tmp_path):
    kw = dict(region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    cfn = boto3.client("cloudformation", **kw)
    with Stubber(cfn) as s_cfn:
        s_cfn.add_response(
            "describe_stacks",
            {
                "Stacks": [
                    {
                        "StackName": "fleet-7",
                        "CreationTime": "2026-01-01T00:00:00Z",
                        "StackStatus": "CREATE_IN_PROGRESS",
                    }
                ]
            },
            {"StackName": "fleet-7"},
        )
        with pytest.raises(SystemExit, match="CREATE_IN_PROGRESS"):
            aws_setup.setup_from_stack(None, cfn, stack="fleet-7", claim_csr=None, out=tmp_path)
