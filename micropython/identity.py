# The board's identity: fleet provisioning by claim, then certificate rotation. Keys are made on the
# board (p256.keygen from the board's RNG), stored only in its flash (encrypted on ESP32 when flash
# encryption is on) and never sent: the cloud gets a CSR. Both flows are write-ahead state machines
# (state/prov.json, state/rot.json) and each decision is ONE write of state/identity.json:
#   provisioned   identity.json names the thing, certificate and key (prov.json is then dropped)
#   proven        the new certificate connected: identity.json names it and, under "old", the one to
#                 retire (rot.json is then dropped)
#   abandoned     rot.json says "abandon": the new certificate never connected; the old one stays
# Everything after a decision (dropping the state file, telling the cloud, deleting the loser's files,
# reporting the job) is idempotent and redone from that record after a power cut. The cloud is told
# to retire the old certificate only over a connection made with the new one, and to abandon the new
# one only over a connection made with the old; the files of the identity in use are never deleted.
import binascii
import hashlib
import os
import p256
import store
from mqtt import Refused

PROV = "state/prov.json"
ROT = "state/rot.json"
IDENT = "state/identity.json"
THING_OK = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_-"
HEX = "0123456789abcdef"
MAX_PEM = 4096  # an AWS IoT device certificate is about 1.3 KB of PEM
# Ownership tokens from AWS are a few hundred bytes. The board holds one in about four copies at once
# (the answer, the parsed dict, the state file's JSON, the RegisterThing request): 4 KB keeps that
# inside its heap target, while the Linux agent, which has room, takes up to 8 KB.
MAX_TOKEN = 4096


def _new_key(a, tag):
    d, pub = p256.keygen(a.board.random)
    path = "id/key-%s-%d.pem" % (tag, a.board.now())
    store.mkdir("id")
    store.write(a.board, path, p256.pem("EC PRIVATE KEY", p256.key_der(d, pub)))
    return path


def _load_key(path):
    # Our own SEC1 layout (p256.key_der): d at bytes 7..39, the public point in the last 65.
    der = p256.unpem(store.read(path), "EC PRIVATE KEY")
    if len(der) != 121 or der[:7] != b"\x30\x77\x02\x01\x01\x04\x20":
        raise ValueError("%s is not a P-256 key made by this agent" % path)
    return int.from_bytes(der[7:39], "big"), der[-65:]


def _csr(path, cn):
    d, pub = _load_key(path)
    return p256.pem("CERTIFICATE REQUEST", p256.csr_der(d, pub, cn)), pub


def _certificate(a, resp, pub, tag):
    """Check a CreateCertificateFromCsr answer completely (hostile input), then save the certificate."""
    cid, pem, tok = resp.get("certificateId"), resp.get("certificatePem"), resp.get("certificateOwnershipToken")
    if not (isinstance(cid, str) and len(cid) == 64 and all(ch in HEX for ch in cid)):
        raise Refused("certificateId is not 64 lowercase hex digits")
    if not (isinstance(tok, str) and 0 < len(tok) <= MAX_TOKEN and all(" " < ch < "\x7f" for ch in tok)):
        raise Refused("certificateOwnershipToken is not 1..%d printable characters" % MAX_TOKEN)
    if not (isinstance(pem, str) and len(pem) <= MAX_PEM and pem.count("-----BEGIN") == 1):
        raise Refused("certificatePem is not one certificate of at most %d characters" % MAX_PEM)
    try:
        der = p256.unpem(pem, "CERTIFICATE")
        mine = p256.pub_from_cert_der(der) == pub  # one DER certificate, nothing after it
    except ValueError:
        raise Refused("certificatePem is not a P-256 certificate")
    if not mine:
        raise Refused("the issued certificate is not for this device's key")
    if binascii.hexlify(hashlib.sha256(der).digest()).decode() != cid:
        raise Refused("certificateId is not the SHA-256 of the certificate")
    if a.ident and cid == a.ident["cert_id"]:
        raise Refused("the answer names the certificate in use")
    path = "id/cert-%s-%s.pem" % (tag, cid)
    store.write(a.board, path, p256.pem("CERTIFICATE", der))  # the checked DER, nothing around it
    return {"cert": path, "cert_id": cid, "token": tok}


def _thing(resp, want=None):
    """The thingName of a RegisterThing answer: AWS's pattern, and the board's own thing on rotation."""
    t = resp.get("thingName", want)
    if not (isinstance(t, str) and 0 < len(t) <= 128 and all(ch in THING_OK for ch in t)) or (want and t != want):
        raise Refused("RegisterThing answered an unusable thingName")
    return t


def _drop(a, path):
    """Delete a key or certificate file, never one of the identity in use."""
    if path and not (a.ident and path in (a.ident["cert"], a.ident["key"])):
        store.remove(a.board, path)


def tidy(a):
    """Delete the files in id/ that no state refers to (written just before a power cut)."""
    keep = []
    for st in (a.ident, a.ident.get("old"), store.load(ROT), store.load(PROV)):
        if st:
            keep += [st.get("cert"), st.get("key")]
    for n in os.listdir("id"):
        if "id/" + n not in keep:
            _drop(a, "id/" + n)


async def provision(a):
    """Claim certificate -> own key, CSR, certificate, thing. Returns the saved identity."""
    cfg, b = a.cfg, a.board
    st = store.load(PROV, {})
    if "key" not in st:
        st = {"key": _new_key(a, "dev")}
        store.save(b, PROV, st)
        b.cut("prov.after_key")
        await a.mark("keygen")
    c = await a.connect(store.read(cfg["claim_cert"]), store.read(cfg["claim_key"]), cfg["serial"])
    try:
        tpl = "$aws/provisioning-templates/%s/provision/json" % cfg["template"]
        await c.subscribe("$aws/certificates/create-from-csr/json/+", 1)
        await c.subscribe(tpl + "/+", 1)
        if "token" not in st:
            csr, pub = _csr(st["key"], cfg["serial"])
            await a.mark("csr")
            resp = await a.request(c, "$aws/certificates/create-from-csr/json", {"certificateSigningRequest": csr})
            st.update(_certificate(a, resp, pub, "dev"))
            csr = resp = None
            store.save(b, PROV, st)
            b.cut("prov.after_certificate")
        try:
            resp = await a.request(c, tpl, {"certificateOwnershipToken": st["token"],
                                            "parameters": {"SerialNumber": cfg["serial"]}})
        except Refused:
            st.pop("token")  # it may have expired: the next try asks for a new certificate
            store.save(b, PROV, st)
            raise
        a.ident = {"thing": _thing(resp), "cert": st["cert"], "key": st["key"], "cert_id": st["cert_id"]}
        store.save(b, IDENT, a.ident)  # the decision
        b.cut("prov.after_identity")
        store.remove(b, PROV)
        tidy(a)
        print("provisioned as", a.thing)
        return a.ident
    finally:
        c.close()


# -- rotation ---------------------------------------------------------------------------------
async def rotate_prepare(a, c, job_id):
    """Over the current connection: new key, CSR, certificate, registration; ends in step "switch"."""
    b = a.board
    r = store.load(ROT) or {"job": job_id}
    await c.subscribe("$aws/certificates/create-from-csr/json/+", 1)
    await c.subscribe("$aws/provisioning-templates/%s/provision/json/+" % a.cfg["rotation_template"], 1)
    if "key" not in r:
        r["key"] = _new_key(a, "rot")
        store.save(b, ROT, r)
        b.cut("rot.after_key")
        await a.mark("rot-keygen")
    if "cert" not in r:
        csr, pub = _csr(r["key"], a.thing)
        resp = await a.request(c, "$aws/certificates/create-from-csr/json", {"certificateSigningRequest": csr})
        r.update(_certificate(a, resp, pub, "rot"))
        csr = resp = None  # the heap is short: no second copy of the certificate through the next round trip
        store.save(b, ROT, r)
        b.cut("rot.after_certificate")
        await a.mark("rot-certificate")
    if r.get("step") != "switch":
        _thing(await a.request(c, "$aws/provisioning-templates/%s/provision/json" % a.cfg["rotation_template"],
                               {"certificateOwnershipToken": r["token"], "parameters": {"ThingName": a.thing}}),
               a.thing)
        r["step"] = "switch"
        r.pop("token")
        store.save(b, ROT, r)
        b.cut("rot.after_registered")
        await a.mark("rot-registered")
        print("rotation: new certificate", r["cert_id"][:12], "registered; switching")
    return r


def rotate_proven(a):
    """The new certificate connected: one write makes it the identity and names the old one to retire."""
    r, old = store.load(ROT), a.ident
    a.ident = {"thing": old["thing"], "cert": r["cert"], "key": r["key"], "cert_id": r["cert_id"], "job": r.get("job"),
               "old": {"cert": old["cert"], "key": old["key"], "cert_id": old["cert_id"]}}
    store.save(a.board, IDENT, a.ident)  # the decision
    a.board.cut("rot.after_proven")
    store.remove(a.board, ROT)


def rotate_not_proven(a, why):
    r = store.load(ROT)
    r.update(step="abandon", why=why[:150])
    store.save(a.board, ROT, r)  # the decision
    print("rotation: the new certificate did not connect:", why)


async def rotate_finish(a, c):
    """Carry out the decision on flash over connection c (made with a.cid): tell the cloud which
    certificate to deactivate, drop the loser's files, report the job, then close the flow."""
    ident = a.ident
    old = ident.get("old")
    if old:
        if a.cid != ident["cert_id"] or old["cert_id"] == a.cid:
            raise Exception("rotation: not connected with the new certificate; the old one is not retired yet")
        job, details = ident.get("job"), {"certificateId": ident["cert_id"]}
        try:
            await a.request(c, "dt/%s/certificate-rotation/commit" % a.thing,
                            {"newCertificateId": ident["cert_id"], "oldCertificateId": old["cert_id"],
                             "clientToken": a.token()}, "cmd/%s/certificate-rotation/commit" % a.thing)
        except Refused as e:
            # The board is on its proven new certificate either way; the operator must retire the old one.
            details["warning"] = "the cloud did not deactivate the old certificate: %s" % str(e)[:150]
        a.board.cut("rot.after_commit_sent")
        _drop(a, old["cert"])
        _drop(a, old["key"])
        out = ("SUCCEEDED", details)
    else:
        r = store.load(ROT)
        if a.cid != ident["cert_id"] or r.get("cert_id") == a.cid:
            raise Exception("rotation: not connected with the old certificate; the new one is not abandoned yet")
        job = r.get("job")
        if r.get("cert_id"):
            try:
                await a.request(c, "dt/%s/certificate-rotation/abandon" % a.thing,
                                {"certificateId": r["cert_id"], "clientToken": a.token()},
                                "cmd/%s/certificate-rotation/abandon" % a.thing)
            except Refused:
                pass
        _drop(a, r.get("cert"))
        _drop(a, r.get("key"))
        out = ("FAILED", {"reason": "new certificate not proven: %s" % r.get("why", "refused")})
    if job:
        await a.finish(c, job, out[0], out[1])  # recorded in state/jobs.json before the flow closes
    if old:
        ident.pop("old")
        ident.pop("job", None)
        store.save(a.board, IDENT, ident)
    else:
        store.remove(a.board, ROT)
    tidy(a)
    print("rotation:", out[0])
