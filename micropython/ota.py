# Signed OTA for the board: the same job document as the Linux agent (operation "ota-update",
# schema 1, ECDSA-P256-SHA256 over the artifact), delivered by an AWS IoT MQTT file stream. Blocks
# go to flash as they arrive and into SHA-256 in order; the signature is checked against the pinned
# code-signing key before one byte is unpacked. The artifact is a ustar archive of the app's files
# plus a VERSION file: that signed VERSION is the release's version (the document's is not signed: if
# given, it must be the same and only lets a stale or broken release be refused before the download).
# Versions have one spelling, MAJOR.MINOR.PATCH in ASCII digits without leading zeros, as on Linux,
# so a release that failed here cannot come back under another. The new files are staged in app.new;
# loader.py swaps them in on reset, and the agent commits after its self-test or the loader rolls back.
import binascii
import hashlib
import json
import os
import store
from agent import Reject

DL = "ota/download.bin"
NEW = "app.new"
NAME_OK = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


def vkey(v):
    """[MAJOR, MINOR, PATCH] of a canonical version ("1.0.0", "10.2.33"); Reject for any other spelling."""
    p = v.split(".") if isinstance(v, str) else ()
    if len(p) != 3 or not all(0 < len(x) <= 9 and (x == "0" or x[0] != "0") and all(c in "0123456789" for c in x)
                              for x in p):
        raise Reject("version %r is not MAJOR.MINOR.PATCH in ASCII digits without leading zeros"
                     % (v[:20] if isinstance(v, str) else type(v).__name__))
    return [int(x) for x in p]


def parse(a, doc):
    """(the document's version or None, size, sha256 bytes, signature DER, stream id, file id) or Reject."""
    if not isinstance(doc, dict) or doc.get("schema") != 1:
        raise Reject("schema must be 1")
    for k in doc:
        if k not in ("operation", "schema", "target", "version", "artifact", "signature"):
            raise Reject("document: unknown field %s" % k)
    if doc.get("target") != a.cfg["target"]:
        raise Reject("unknown target %r (this board updates %r)" % (doc.get("target"), a.cfg["target"]))
    version = doc.get("version")
    if version is not None:
        vkey(version)
    art, sig = doc.get("artifact"), doc.get("signature")
    if not isinstance(art, dict) or not isinstance(sig, dict):
        raise Reject("artifact and signature must be objects")
    if "url" in art:
        raise Reject("this board takes updates over MQTT streams only")
    size, sha, st = art.get("size"), art.get("sha256"), art.get("stream")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= a.cfg["max_artifact_bytes"]:
        raise Reject("artifact.size must be 1..%d bytes" % a.cfg["max_artifact_bytes"])
    try:
        digest = binascii.unhexlify(sha.encode())
        der = binascii.a2b_base64(sig.get("value").encode())
    except Exception:
        raise Reject("artifact.sha256 must be hex and signature.value base64")
    if len(digest) != 32 or sig.get("algorithm") != "ECDSA-P256-SHA256" or not 8 <= len(der) <= 72:
        raise Reject("need a SHA-256 digest and an ECDSA-P256-SHA256 signature")
    if not isinstance(st, dict) or not isinstance(st.get("id"), str) or not 0 < len(st["id"]) <= 128 \
            or not all(c in NAME_OK for c in st["id"]):
        raise Reject("artifact.stream.id is missing or has invalid characters")
    fid = st.get("file_id", 0)
    if not isinstance(fid, int) or not 0 <= fid <= 255:
        raise Reject("artifact.stream.file_id must be 0..255")
    return version, size, digest, der, st["id"], fid


def check_version(a, version):
    cur, key = a.version, vkey(version)
    if version in store.load("state/broken.json", []):
        raise Reject("version %s failed on this device before" % version)
    try:
        old = vkey(cur)
    except Reject:  # installed before versions were canonical: compare its numbers
        old = ([int(x) for x in cur.split(".") if x.isdigit()] + [0, 0, 0])[:3]
    if key <= old and not a.cfg.get("insecure_allow_downgrade"):
        raise Reject("version %s is not newer than the installed %s" % (version, cur))


async def download(a, c, sid, fid, size, digest):
    """Blocks in order from the stream to flash, hashed as they land; bounded retries."""
    bs = a.cfg["block_size"]
    nblocks = (size + bs - 1) // bs
    topic = "$aws/things/%s/streams/%s/" % (a.thing, sid)
    await c.subscribe(topic + "data/json", 1)
    await c.subscribe(topic + "rejected/json", 1)
    store.mkdir("ota")
    h = hashlib.sha256()
    nxt, misses = 0, 0
    with open(DL, "wb") as f:
        while nxt < nblocks:
            n = min(8, nblocks - nxt)
            await c.publish(topic + "get/json", json.dumps({"f": fid, "l": bs, "o": nxt, "n": n, "c": a.token()}))
            want = nxt + n
            while nxt < want:
                m = await c.msg(10000)
                if m is None:
                    misses += 1
                    if misses > 10:
                        raise Exception("stream %s stopped sending blocks" % sid)
                    break
                t, p = m
                if t == topic + "rejected/json":
                    raise Exception("stream refused: %s" % p[:200])
                if t != topic + "data/json":
                    a.later(m)
                    continue
                blk = json.loads(p)
                if blk.get("f") != fid or blk.get("i") != nxt or blk.get("l") != bs:
                    continue  # a duplicate or a stray block: only the next one in order is taken
                data = binascii.a2b_base64(blk.get("p", "").encode())
                if len(data) != min(bs, size - nxt * bs):
                    raise Exception("block %d has %d bytes" % (nxt, len(data)))
                f.write(data)
                h.update(data)
                nxt += 1
                if nxt == 12:
                    a.board.cut("ota.mid_download")
                await a.mark("block")
            if nxt and nxt % 16 == 0:
                await a.progress("downloading", "%d%%" % (nxt * 100 // nblocks))
    a.board.sync()
    if h.digest() != digest:
        raise Reject("artifact sha256 does not match the document")


def verify(a, digest, der):
    import p256  # loaded only now: the download ran without its code in RAM
    key = p256.pub_from_cert_pem(store.read(a.cfg["code_signing_cert"]))
    if not p256.verify(key, digest, der):
        raise Reject("signature does not verify against the pinned code-signing key")


def unpack(a):
    """ustar -> app.new/, plain file names only. Returns the archive's (signed) VERSION."""
    store.remove(a.board, NEW)
    os.mkdir(NEW)
    seen = 0
    with open(DL, "rb") as f:
        while True:
            hdr = f.read(512)
            if len(hdr) < 512 or hdr == bytes(512):
                break
            name = hdr[:100].split(b"\0")[0].decode()
            if hdr[345:346] not in (b"\0", b""):
                raise Reject("archive member with a path prefix")
            if name.startswith("./"):
                name = name[2:]
            kind = hdr[156:157]
            if kind == b"5" and name.rstrip("/") in ("", "."):
                continue
            if kind not in (b"0", b"\0") or not name or name[0] == "." or len(name) > 64 \
                    or not all(ch in NAME_OK for ch in name):
                raise Reject("archive member %r is not a plain file" % name[:64])
            try:
                n = int(hdr[124:136].split(b"\0")[0].strip() or b"0", 8)
            except ValueError:
                raise Reject("archive header is corrupt")
            seen += 1
            if seen > 64:
                raise Reject("archive has too many files")
            with open(NEW + "/" + name, "wb") as out:
                left = n
                while left:
                    chunk = f.read(min(512, left))
                    if not chunk:
                        raise Reject("archive is truncated")
                    out.write(chunk)
                    left -= len(chunk)
            f.read((512 - n % 512) % 512)
    try:
        got = store.read(NEW + "/VERSION")
    except OSError:
        raise Reject("the archive has no VERSION")
    a.board.sync()
    return got[:-1] if got.endswith("\n") else got  # the file's one line ending is not part of it


async def run(a, c, job_id, doc):
    said, size, digest, der, sid, fid = parse(a, doc)
    if said:
        check_version(a, said)  # refuse a stale or broken release before downloading it
    await a.progress("downloading", "0%")
    await download(a, c, sid, fid, size, digest)
    verify(a, digest, der)
    await a.mark("verify")
    version = unpack(a)
    if said and version != said:
        raise Reject("the archive's VERSION (%r) is not the document's version %s" % (version[:20], said))
    check_version(a, version)  # the signed VERSION decides
    a.board.cut("ota.after_unpack")
    await a.mark("unpack")
    store.remove(a.board, DL)
    # Write ahead: the loader swaps on the next boot; this job is settled after the self-test.
    store.save(a.board, "state/boot.json", {"state": "pending", "version": version, "job": job_id, "from": a.version})
    a.board.cut("ota.after_pending")
    await a.progress("restarting", "100%", version)
    a.restart("ota: release %s staged" % version)
