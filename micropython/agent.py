# The board agent's lifecycle: clock gate (SNTP) -> identity (provision by claim) -> sessions over
# mTLS with the thing name as client ID: settle the last update, Device Defender custom metrics,
# jobs (signed OTA over MQTT streams, certificate rotation). A lost session is retried with jittered
# exponential backoff; nothing here blocks longer than one network timeout.
import json
import sys
import time
import asyncio
import mqtt
import sntp
import store
from mqtt import Refused

REQUIRED = ("endpoint", "port", "ca", "claim_cert", "claim_key", "serial", "template", "code_signing_cert", "ntp")
DEFAULTS = {"rotation_template": "iot-agent-rotation", "target": "mpy-app", "keepalive": 60,
            "defender_interval_s": 300, "self_test_s": 90, "block_size": 1024, "max_artifact_bytes": 256 * 1024,
            "backoff_min_s": 1, "backoff_max_s": 120, "insecure_allow_downgrade": False, "heap_probe": False}
MIN_DEFENDER_S = 300  # AWS IoT Device Defender takes one report per 5 minutes
JOBS = "state/jobs.json"
IDENT = "state/identity.json"
ROT = "state/rot.json"


class Reject(Exception):
    """The job is REJECTED with this reason; nothing was installed."""


def rare(name):
    """Import a module for a rare flow (provisioning, rotation, OTA); drop() frees its code after."""
    return __import__(name)


def drop():
    for n in ("identity", "ota", "p256"):
        sys.modules.pop(n, None)


def load_config():
    cfg = store.load("config.json")
    if not isinstance(cfg, dict):
        raise ValueError("config.json is missing or not a JSON object: copy it to the board (README, MicroPython)")
    for k in REQUIRED:
        if k not in cfg:
            raise ValueError("config.json: %s is required" % k)
    for k in DEFAULTS:
        cfg.setdefault(k, DEFAULTS[k])
    if not 256 <= cfg["block_size"] <= 4096:
        raise ValueError("config.json: block_size must be 256..4096")
    cfg["defender_interval_s"] = max(MIN_DEFENDER_S, cfg["defender_interval_s"])
    return cfg


class Agent:
    def __init__(self, board, boot):
        self.board = board
        self.boot = boot
        self.cfg = load_config()
        self.version = store.read("app/VERSION").strip()
        self.ident = store.load(IDENT)
        if self.ident and store.exists("state/prov.json"):  # cut after the identity was saved
            store.remove(board, "state/prov.json")
            rare("identity").tidy(self)
            drop()
        if boot.get("state") != "pending":  # leftovers of an update a power cut interrupted
            store.remove(board, "app.new")
            store.remove(board, "ota/download.bin")
        self.t0 = time.ticks_ms()
        self.hw = 0
        self.fails = 0
        self.reconnects = 0
        self.rot_fails = 0
        self.n = 0
        self.pending = []
        self.c = None
        self.cid = None  # the id of the certificate the current connection was made with
        self.job = None

    @property
    def thing(self):
        return self.ident["thing"]

    async def mark(self, where=""):
        """Heap high-water probe for the footprint benchmark: live bytes after a collection."""
        if self.cfg["heap_probe"]:
            n = await self.board.live_heap()
            if n > self.hw:
                self.hw = n
                print("heap high-water", n, where)

    def restart(self, why):
        """Reset; never returns (loader.reset: a reset that returns restarts in-process)."""
        import loader
        loader.reset(self.board, why)

    def token(self):
        self.n += 1
        return "%d-%d" % (self.board.now(), self.n)

    def later(self, m):
        if len(self.pending) < 16:
            self.pending.append(m)

    async def backoff(self):
        lo, hi = self.cfg["backoff_min_s"], self.cfg["backoff_max_s"]
        d = min(hi, lo * (1 << min(self.fails, 16)))
        self.fails += 1
        j = int.from_bytes(self.board.random(2), "big") / 65535
        await asyncio.sleep(d / 2 + j * d / 2)  # full-range jitter keeps a fleet from reconnecting in step

    async def connect(self, cert, key, client_id):
        if not sntp.sane(self.board.now()):
            raise Exception("clock not set: no TLS before it is")
        cfg = self.cfg
        s = await self.board.tls(cfg["endpoint"], cfg["port"], store.read(cfg["ca"]), cert, key)
        c = mqtt.Client(s, client_id, cfg["keepalive"])
        try:
            await c.connect()
        except Exception:
            c.close()
            raise
        return c

    async def request(self, c, topic, body, reply=None, timeout_ms=20000):
        """Publish, then wait for reply/accepted (its document) or reply/rejected (Refused)."""
        reply = reply or topic
        await c.publish(topic, json.dumps(body), 1)
        t0 = time.ticks_ms()
        while True:
            left = timeout_ms - time.ticks_diff(time.ticks_ms(), t0)
            m = await c.msg(left) if left > 0 else None
            if m is None:
                raise Exception("no answer on %s" % reply)
            t, p = m
            if t == reply + "/accepted":
                self.board.cut("request.answered")
                return json.loads(p)
            if t == reply + "/rejected":
                raise Refused("%s: %s" % (reply, p[:300].decode()))
            self.later(m)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self):
        print("agent", self.version, "on", self.board.NAME)
        while not sntp.sane(self.board.now()):
            t = await sntp.sync(self.board, self.cfg["ntp"])
            if t:
                print("clock set from SNTP:", t)
                break
            print("clock: no trustworthy SNTP answer; no TLS until there is one")
            await self.backoff()
        self.fails = 0
        while not self.ident:
            try:
                await rare("identity").provision(self)
            except Exception as e:
                print("provisioning failed:", repr(e))
                sys.print_exception(e)
                await self.backoff()
                continue
            # A fresh start drops the claim credentials and the provisioning code from RAM.
            self.restart("provisioned: restarting on the new identity")
        trial = self.boot.get("state") == "trial"
        while True:
            try:
                if await self.session():
                    continue  # switch to a rotated certificate right away
            except Exception as e:
                print("session ended:", e)
            self.reconnects += 1
            if trial and self.boot.get("state") == "trial" and \
                    time.ticks_diff(time.ticks_ms(), self.t0) > self.cfg["self_test_s"] * 1000:
                self.restart("self-test failed: no connection within %d s" % self.cfg["self_test_s"])
            await self.backoff()

    async def session(self):
        rot = store.load(ROT)
        if rot and rot.get("cert_id") == self.ident["cert_id"]:  # proven: identity.json already says so
            store.remove(self.board, ROT)
            rot = None
        new = rot is not None and rot.get("step") == "switch"
        ident = rot if new else self.ident
        try:
            c = await self.connect(store.read(ident["cert"]), store.read(ident["key"]), self.thing)
        except Exception as e:
            if new:
                self.rot_fails += 1
                if self.rot_fails >= 3:
                    rare("identity").rotate_not_proven(self, str(e))
            raise
        self.c, self.cid = c, ident["cert_id"]
        try:
            if new:
                rare("identity").rotate_proven(self)
                print("rotation: the new certificate connected")
            j = "$aws/things/%s/jobs/" % self.thing
            for f in (j + "notify-next", j + "start-next/+", j + "+/update/+",
                      "$aws/things/%s/defender/metrics/json/+" % self.thing,
                      "cmd/%s/certificate-rotation/+/+" % self.thing):
                await c.subscribe(f, 1)
            print("connected as", self.thing)
            self.fails = 0
            await self.mark("connected")
            await self.settle_boot(c)
            if self.ident.get("old") or rot and rot.get("step") == "abandon":
                await rare("identity").rotate_finish(self, c)
                drop()
            await self.report(c)
            if await self.next_job(c):
                return True
            while True:
                m = self.pending.pop(0) if self.pending else await c.msg(5000)
                if m and m[0] == j + "notify-next":
                    if await self.next_job(c):
                        return True
                await self.report(c)
        finally:
            c.close()
            self.c = None

    async def settle_boot(self, c):
        """Settle the update the loader acted on: commit after this self-test, or report the rollback."""
        st = self.boot
        s, job, v = st.get("state"), st.get("job"), st.get("version")
        if s == "trial" and self.version != v:
            s = "rolledback"  # the loader could not finish a swap: this is not the release on trial
        if s == "trial":
            store.save(self.board, "state/boot.json", {"state": "committed", "job": job, "version": v})
            self.board.cut("ota.after_commit_saved")
            s = "committed"
            print("self-test passed: release", v, "committed")
        if s == "committed":
            store.remove(self.board, "app.old")
            await self.finish(c, job, "SUCCEEDED", {"step": "committed", "progress": "100%", "result": "installed",
                                                    "version": v})
        elif s == "rolledback":
            broken = store.load("state/broken.json", [])
            if v not in broken:
                store.save(self.board, "state/broken.json", (broken + [v])[-8:])
            await self.finish(c, job, "FAILED", {"step": "rolled-back", "reason": "rolled back to %s: release %s "
                                                 "did not pass its self-test" % (st.get("from"), v)})
        if s:
            store.save(self.board, "state/boot.json", {})
            self.boot = {}

    async def finish(self, c, job, status, details):
        """Record the outcome first (a job handed out again gets it back), then tell the cloud."""
        done = store.load(JOBS, {})
        if job not in done:
            done[job] = [status, details]
            while len(done) > 8:  # forget another job's: this one's record must outlive a cut before the cloud hears
                done.pop(min(k for k in done if k != job))
            store.save(self.board, JOBS, done)
        try:
            await self.request(c, "$aws/things/%s/jobs/%s/update" % (self.thing, job),
                               {"status": status, "statusDetails": details})
        except Refused as e:
            print("job", job, "update refused:", e)  # already terminal in the cloud
        print("job", job, status, details)
        self.job = None

    async def progress(self, step, pct, version=None):
        d = {"step": step, "progress": pct}
        if version:
            d["version"] = version
        await self.request(self.c, "$aws/things/%s/jobs/%s/update" % (self.thing, self.job),
                           {"status": "IN_PROGRESS", "statusDetails": d})

    async def next_job(self, c):
        """Run pending jobs in turn; True when the session must end to switch certificates."""
        while True:
            ex = (await self.request(c, "$aws/things/%s/jobs/start-next" % self.thing,
                                     {"clientToken": self.token()})).get("execution")
            if not isinstance(ex, dict):
                return False
            job, doc = ex.get("jobId"), ex.get("jobDocument")
            if not isinstance(job, str) or not 0 < len(job) <= 64:
                return False
            done = store.load(JOBS, {})
            if job in done:
                await self.finish(c, job, done[job][0], done[job][1])
                continue
            if await self.run_job(c, job, doc):
                return True

    async def run_job(self, c, job, doc):
        ota = identity = out = None
        self.job = job
        op = doc.get("operation") if isinstance(doc, dict) else None
        print("job", job, "started:", op)
        try:
            if op == "ota-update":
                ota = rare("ota")
                await ota.run(self, c, job, doc)
            elif op == "rotate-certificate":
                r = store.load(ROT)
                if r and r.get("job") != job:
                    raise Reject("another certificate rotation is in progress")
                identity = rare("identity")
                try:
                    await identity.rotate_prepare(self, c, job)
                except Refused as e:
                    identity.rotate_not_proven(self, str(e))
                    await identity.rotate_finish(self, c)
                    return False
                # Like provisioning: start afresh on the new certificate (step "switch" is on flash).
                c.close()
                self.restart("rotation: the new certificate is ready")
            else:
                raise Reject("unsupported operation %r" % op)
        except Reject as e:
            out = ("REJECTED", {"reason": str(e)})
        except mqtt.MQTTError:
            raise  # the session is gone; the job is handed out again on the next one
        except Exception as e:
            out = ("FAILED", {"reason": str(e)[:200]})
        finally:  # nothing of a refused update stays on flash, before the cloud hears the outcome
            store.remove(self.board, "ota/download.bin")
            if store.load("state/boot.json", {}).get("state") != "pending":  # a staged release waits for the loader
                store.remove(self.board, "app.new")
            ota = identity = None
            drop()
            await self.mark("job done")
        if out:
            await self.finish(c, job, out[0], out[1])
        return False

    async def report(self, c):
        """Device Defender custom metrics, at most one report per interval (kept across resets)."""
        now = self.board.now()
        last = store.load("state/defender.json", {}).get("at", 0)
        if now - last < self.cfg["defender_interval_s"]:
            return
        b = self.board
        m = {"free_heap_bytes": b.free_heap(), "uptime_s": time.ticks_diff(time.ticks_ms(), self.t0) // 1000,
             "reconnects": self.reconnects}
        if b.rssi() is not None:
            m["wifi_rssi_dbm"] = b.rssi()
        doc = {"header": {"report_id": now, "version": "1.0"}, "custom_metrics": {}}
        for k in m:
            doc["custom_metrics"][k] = [{"number": m[k]}]
        ns = b.net_stats()
        if ns:
            doc["metrics"] = {"network_stats": ns}
        store.save(b, "state/defender.json", {"at": now})  # a rejected report also waits its turn
        try:
            await self.request(c, "$aws/things/%s/defender/metrics/json" % self.thing, doc)
            print("defender report", now, "accepted")
        except Refused as e:
            print("defender report rejected:", e)
        await self.mark("defender")


async def main(board, boot):
    await Agent(board, boot).run()
