# The board's identity: fleet provisioning by claim, then certificate rotation. Keys are made on the
# board (p256.keygen from the board's RNG), stored only in its flash (encrypted on ESP32 when flash
# encryption is on) and never sent: the cloud gets a CSR. Both flows are write-ahead state machines
# in state/prov.json and state/rot.json, so a power cut at any step resumes, and the device always
# keeps a certificate that works: the old one stays until the new one has connected.
import p256
import store
from mqtt import Refused

PROV = "state/prov.json"
ROT = "state/rot.json"
IDENT = "state/identity.json"
THING_OK = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_-"


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
    """Save the certificate the cloud issued, after checking it is for our key (hostile input)."""
    cid, pem, tok = resp.get("certificateId"), resp.get("certificatePem"), resp.get("certificateOwnershipToken")
    if not (isinstance(cid, str) and 8 <= len(cid) <= 64 and isinstance(pem, str) and len(pem) < 8192
            and isinstance(tok, str) and 0 < len(tok) < 4096):
        raise Refused("malformed CreateCertificateFromCsr answer")
    if p256.pub_from_cert_pem(pem) != pub:
        raise Refused("the issued certificate is not for this device's key")
    path = "id/cert-%s-%s.pem" % (tag, cid[:16])
    store.write(a.board, path, pem)
    return {"cert": path, "cert_id": cid, "token": tok}


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
            store.save(b, PROV, st)
            b.cut("prov.after_certificate")
        try:
            resp = await a.request(c, tpl, {"certificateOwnershipToken": st["token"],
                                            "parameters": {"SerialNumber": cfg["serial"]}})
        except Refused:
            st.pop("token")  # it may have expired: the next try asks for a new certificate
            store.save(b, PROV, st)
            raise
        thing = resp.get("thingName")
        if not (isinstance(thing, str) and 0 < len(thing) <= 128 and all(ch in THING_OK for ch in thing)):
            raise Refused("RegisterThing gave no usable thingName")
        ident = {"thing": thing, "cert": st["cert"], "key": st["key"], "cert_id": st["cert_id"]}
        store.save(b, IDENT, ident)
        b.cut("prov.after_identity")
        store.remove(b, PROV)
        print("provisioned as", thing)
        return ident
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
        store.save(b, ROT, r)
        b.cut("rot.after_certificate")
        await a.mark("rot-certificate")
    if r.get("step") != "switch":
        await a.request(c, "$aws/provisioning-templates/%s/provision/json" % a.cfg["rotation_template"],
                        {"certificateOwnershipToken": r["token"], "parameters": {"ThingName": a.thing}})
        r["step"] = "switch"
        r.pop("token")
        store.save(b, ROT, r)
        b.cut("rot.after_registered")
        await a.mark("rot-registered")
        print("rotation: new certificate", r["cert_id"][:12], "registered; switching")
    return r


def rotate_proven(a):
    """The new certificate connected: from here on it is the identity (the old one is kept for commit)."""
    r = store.load(ROT)
    old = a.ident
    r.update(step="commit", old=old)
    store.save(a.board, ROT, r)
    a.ident = {"thing": old["thing"], "cert": r["cert"], "key": r["key"], "cert_id": r["cert_id"]}
    store.save(a.board, IDENT, a.ident)
    a.board.cut("rot.after_proven")


def rotate_not_proven(a, why):
    r = store.load(ROT)
    r.update(step="abandon", why=why)
    store.save(a.board, ROT, r)
    print("rotation: the new certificate did not connect:", why)


async def rotate_finish(a, c):
    """Tell the cloud which certificate to deactivate, then drop the loser's files. Returns the outcome."""
    r = store.load(ROT)
    if r["step"] == "commit":
        details = {"certificateId": r["cert_id"]}
        try:
            await a.request(c, "dt/%s/certificate-rotation/commit" % a.thing,
                            {"newCertificateId": r["cert_id"], "oldCertificateId": r["old"]["cert_id"],
                             "clientToken": a.token()}, "cmd/%s/certificate-rotation/commit" % a.thing)
        except Refused as e:
            # The board is on its proven new certificate either way; the operator must retire the old one.
            details["warning"] = "the cloud did not deactivate the old certificate: %s" % str(e)[:150]
        a.board.cut("rot.after_commit_sent")
        for f in (r["old"]["cert"], r["old"]["key"]):
            store.remove(a.board, f)
        outcome = ("SUCCEEDED", details)
    else:
        if r.get("cert_id"):
            try:
                await a.request(c, "dt/%s/certificate-rotation/abandon" % a.thing,
                                {"certificateId": r["cert_id"], "clientToken": a.token()},
                                "cmd/%s/certificate-rotation/abandon" % a.thing)
            except Refused:
                pass
        for f in (r.get("cert"), r.get("key")):
            if f:
                store.remove(a.board, f)
        outcome = ("FAILED", {"reason": "new certificate not proven: %s" % r.get("why", "refused")})
    store.remove(a.board, ROT)
    print("rotation:", outcome[0])
    return r.get("job"), outcome

