"""Set up a real AWS account for the agent's fleet provisioning by claim (boto3).

Creates, idempotently: the provisioning role (AWSIoTThingsRegistration), the device and claim
policies from this folder, the fleet provisioning template, and, for a claim CSR made on a
device's token by `iot-agent factory init`, the claim certificate (CreateCertificateFromCsr, so
the claim key never leaves the token) with the claim policy attached. Writes the claim certificate
and a device config skeleton with the account's ATS data endpoint.

    python provisioning/aws_setup.py --region eu-west-1 --claim-csr claim.csr --out ./aws-out

With `--stack NAME` (the fleet stack, provisioning/fleet-stack.yaml, is deployed) the stack owns the
role, policies and template: this script reads their names from the stack's outputs and does only
what a stack cannot: the claim certificate, the endpoint lookup and the device config.

Needs credentials allowed to call iot:* and iam:CreateRole/GetRole/AttachRolePolicy (with --stack:
iot:CreateCertificateFromCsr, iot:AttachPolicy, iot:DescribeEndpoint, cloudformation:DescribeStacks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGISTRATION_POLICY = "arn:aws:iam::aws:policy/service-role/AWSIoTThingsRegistration"
TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def _exists(err: Exception, code: str) -> bool:
    return getattr(err, "response", {}).get("Error", {}).get("Code") == code


def ensure_role(iam, name: str) -> str:
    try:
        arn = iam.create_role(
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(TRUST),
            Description="Lets AWS IoT fleet provisioning register things",
        )["Role"]["Arn"]
    except Exception as e:
        if not _exists(e, "EntityAlreadyExists"):
            raise
        arn = iam.get_role(RoleName=name)["Role"]["Arn"]
    iam.attach_role_policy(RoleName=name, PolicyArn=REGISTRATION_POLICY)
    return arn


def ensure_policy(iot, name: str, document: dict) -> None:
    try:
        iot.create_policy(policyName=name, policyDocument=json.dumps(document))
    except Exception as e:
        if not _exists(e, "ResourceAlreadyExistsException"):
            raise


def template_body(device_policy_name: str) -> dict:
    body = json.loads((HERE / "fleet-template.json").read_text())
    body["Resources"]["policy"]["Properties"]["PolicyName"] = device_policy_name
    return body


def ensure_template(iot, name: str, role_arn: str, device_policy_name: str) -> None:
    body = json.dumps(template_body(device_policy_name))
    try:
        iot.create_provisioning_template(
            templateName=name,
            templateBody=body,
            provisioningRoleArn=role_arn,
            enabled=True,
            description="iot-agent fleet provisioning by claim",
        )
    except Exception as e:
        if not _exists(e, "ResourceAlreadyExistsException"):
            raise
        iot.update_provisioning_template(templateName=name, provisioningRoleArn=role_arn, enabled=True)


def claim_certificate(iot, csr_pem: str, claim_policy_name: str) -> tuple[str, str]:
    """(certificate PEM, certificate ARN) for a CSR made on the device's token; ACTIVE, claim policy attached."""
    r = iot.create_certificate_from_csr(certificateSigningRequest=csr_pem, setAsActive=True)
    iot.attach_policy(policyName=claim_policy_name, target=r["certificateArn"])
    return r["certificatePem"], r["certificateArn"]


def device_config(endpoint: str, template: str) -> str:
    return f"""# iot-agent configuration written by provisioning/aws_setup.py
[device]
state_dir = "/var/lib/iot-agent"

[broker]
endpoint = "{endpoint}"
ca_file = "/etc/iot-agent/AmazonRootCA1.pem"   # download from https://www.amazontrust.com/repository/AmazonRootCA1.pem
port = 8883

[pkcs11]
library = "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
token_label = "iot-agent"

[provisioning]
enabled = true
template_name = "{template}"

[clock]
ntp_servers = ["time.aws.com"]
"""


def setup(
    iot, iam, *, template: str, device_policy: str, claim_policy: str, role: str, claim_csr: str | None, out: Path
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    role_arn = ensure_role(iam, role)
    ensure_policy(iot, device_policy, json.loads((HERE / "device-policy.json").read_text()))
    ensure_policy(iot, claim_policy, json.loads((HERE / "claim-policy.json").read_text()))
    ensure_template(iot, template, role_arn, device_policy)
    return device_side(iot, {"role_arn": role_arn, "template": template}, claim_policy, claim_csr, out)


def device_side(iot, result: dict, claim_policy: str, claim_csr: str | None, out: Path) -> dict:
    """What no stack can do: the claim certificate for a CSR made on a token, the endpoint, the device config."""
    if claim_csr:
        pem, arn = claim_certificate(iot, claim_csr, claim_policy)
        (out / "claim.pem").write_text(pem)
        result["claim_certificate_arn"] = arn
    endpoint = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
    (out / "config.toml").write_text(device_config(endpoint, result["template"]))
    result["endpoint"] = endpoint
    return result


def stack_outputs(cfn, stack: str) -> dict[str, str]:
    """OutputKey -> OutputValue of a deployed stack; a clear error if it is missing or not finished."""
    stacks = cfn.describe_stacks(StackName=stack)["Stacks"]
    if not stacks:
        raise SystemExit(f"stack {stack}: not found; deploy provisioning/fleet-stack.yaml first")
    status = stacks[0]["StackStatus"]
    if status not in ("CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE"):
        raise SystemExit(f"stack {stack}: status {status}; wait until it is CREATE_COMPLETE or UPDATE_COMPLETE")
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def setup_from_stack(iot, cfn, *, stack: str, claim_csr: str | None, out: Path) -> dict:
    outs = stack_outputs(cfn, stack)
    missing = [k for k in ("ProvisioningTemplateName", "ClaimPolicyName") if k not in outs]
    if missing:
        raise SystemExit(f"stack {stack}: outputs {', '.join(missing)} missing; is it provisioning/fleet-stack.yaml?")
    out.mkdir(parents=True, exist_ok=True)
    template = outs["ProvisioningTemplateName"]
    result = {
        "stack": stack,
        "template": template,
        **{k: outs[k] for k in ("OtaBucketName", "SigningProfileName") if k in outs},
    }
    return device_side(iot, result, outs["ClaimPolicyName"], claim_csr, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", required=True)
    ap.add_argument("--template", default="iot-agent-fleet")
    ap.add_argument("--device-policy", default="iot-agent-device")
    ap.add_argument("--claim-policy", default="iot-agent-claim")
    ap.add_argument("--role", default="iot-agent-provisioning")
    ap.add_argument("--claim-csr", type=Path, help="CSR from `iot-agent factory init` (claim key on the token)")
    ap.add_argument("--out", type=Path, default=Path("aws-out"))
    ap.add_argument(
        "--stack",
        help="the deployed fleet stack: take names from its outputs, create only the "
        "claim certificate and the device config",
    )
    args = ap.parse_args(argv)
    import boto3

    session = boto3.Session(region_name=args.region)
    if args.stack:
        result = setup_from_stack(
            session.client("iot"),
            session.client("cloudformation"),
            stack=args.stack,
            claim_csr=args.claim_csr.read_text() if args.claim_csr else None,
            out=args.out,
        )
        print(json.dumps(result, indent=1))
        return 0
    result = setup(
        session.client("iot"),
        session.client("iam"),
        template=args.template,
        device_policy=args.device_policy,
        claim_policy=args.claim_policy,
        role=args.role,
        claim_csr=args.claim_csr.read_text() if args.claim_csr else None,
        out=args.out,
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
