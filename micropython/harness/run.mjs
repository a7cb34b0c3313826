// Runs MicroPython code under the real MicroPython interpreter (WebAssembly) with a board's platform
// layer supplied by Node: TLS sockets (node:tls), UDP for SNTP (node:dgram), random bytes, a flash
// directory and reset. The Python half of that layer is harness/board.py, which shadows micropython/board.py.
//
//   node run.mjs SCRIPT.py [JSON params]      every micropython/*.py is importable from /lib; PARAMS is global
//   node run.mjs --flash DIR [JSON params]    boot a board whose flash is DIR: runs loader.start() from it,
//                                             as main.py does on a board. Exit code 75 = the board reset itself.
//                                             params.cut = NAME: cut the power at the named point (board.cut);
//                                             params.cut_sync = N: cut it after the Nth sweep point (below);
//                                             params.cut_on_change = [PATH, ...]: right after the first sync
//                                             that changed one of these flash files since this boot began.
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";
import crypto from "node:crypto";
import dgram from "node:dgram";
import fs from "node:fs";
import path from "node:path";
import tls from "node:tls";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const lib = path.resolve(here, "..");
const RESET_EXIT = 75;

// A TLS stream: write(u8); read(timeoutMs) -> Uint8Array (empty at end) or null when nothing came in time.
globalThis.tlsOpen = (host, port, caPem, certPem, keyPem) => new Promise((resolve, reject) => {
  const chunks = [];
  let waiting = null;
  let timer = null;
  let closed = false;
  const s = tls.connect({ host, port, servername: host, ca: caPem, cert: certPem, key: keyPem,
                          minVersion: "TLSv1.2" }, () => { clearTimeout(handshake); resolve({
    // Bytes cross the bridge as hex strings: strings are copied, while a Python object handed to JS
    // stays pinned in the Python heap until JS collects its proxy, which would distort the heap figures.
    write: (hex) => { if (!closed) s.write(Buffer.from(hex, "hex")); },
    // Like a socket read on a board: at most maxBytes; the rest stays queued outside the Python heap.
    read: (timeoutMs, maxBytes) => new Promise((r) => {
      if (chunks.length) r(hex(take(maxBytes)));
      else if (closed) r("");
      else {
        waiting = [r, maxBytes];
        if (timeoutMs !== undefined && timeoutMs !== null) {
          timer = setTimeout(() => { if (waiting && waiting[0] === r) { waiting = null; r(null); } }, timeoutMs);
        }
      }
    }),
    close: () => { closed = true; s.destroy(); },
  }); });
  // A server that accepts TCP but never finishes the handshake must not hang the board.
  const handshake = setTimeout(() => { s.destroy(new Error("TLS handshake timed out")); }, 15000);
  const hex = (u) => Buffer.from(u.buffer, u.byteOffset, u.length).toString("hex");
  const take = (max) => {
    const c = chunks[0];
    if (!max || c.length <= max) return chunks.shift();
    chunks[0] = c.subarray(max);
    return c.slice(0, max);
  };
  const wake = (u) => {
    if (u.length) chunks.push(u);
    if (waiting) {
      const [w, max] = waiting;
      waiting = null;
      clearTimeout(timer);
      w(chunks.length ? hex(take(max)) : "");
    }
  };
  s.on("data", (d) => wake(new Uint8Array(d)));
  const end = () => { closed = true; if (waiting) wake(new Uint8Array(0)); };
  s.on("end", end);
  s.on("close", end);
  s.on("error", (e) => { if (!closed) reject(e); end(); });
});

// One UDP request and its first answer (SNTP); null on timeout or error.
globalThis.udpQuery = (host, port, hexPacket, timeoutMs) => new Promise((resolve) => {
  const sock = dgram.createSocket(host.includes(":") ? "udp6" : "udp4");
  const done = (v) => { clearTimeout(t); try { sock.close(); } catch (e) { /* closed */ } resolve(v); };
  const t = setTimeout(() => done(null), timeoutMs);
  sock.on("message", (m) => done(m.toString("hex")));
  sock.on("error", () => done(null));
  sock.send(Buffer.from(hexPacket, "hex"), port, host);
});

globalThis.randomBytes = (n) => crypto.randomBytes(n).toString("hex");

// Live heap bytes, collected from a timer at the top of the JS stack. A gc.collect() called from Python
// here scans the interpreter's own stack conservatively and keeps garbage that stale slots point at;
// from a timer the Python code is suspended (awaiting this promise) and only what is reachable stays.
globalThis.liveHeap = async () => {
  // Python objects lent to JS (the callbacks of awaited promises) stay pinned until JS collects its
  // proxies of them and a FinalizationRegistry task frees them, some turns later. With --expose-gc,
  // collect both sides until the figure stops falling, so only what the program holds is counted.
  const py = () => { mp.runPython("import gc\ngc.collect()\n_live_heap = gc.mem_alloc()"); return mp.globals.get("_live_heap"); };
  await new Promise((r) => setTimeout(r, 0));
  let best = py();
  for (let i = 0; i < 20 && globalThis.gc; i++) {
    globalThis.gc();
    await new Promise((r) => setTimeout(r, 2));
    const n = py();
    if (n >= best && i >= 3) break;
    best = Math.min(best, n);
  }
  return best;
};

const args = process.argv.slice(2);
let flash = null;
if (args[0] === "--flash") { flash = path.resolve(args[1]); args.splice(0, 2); }
const [script, params = "{}"] = flash ? [null, args[0] || "{}"] : args;

const mp = await loadMicroPython({ stdout: (l) => process.stdout.write(l + "\n"), stderr: (l) => process.stderr.write(l + "\n"),
                                   linebuffer: true });
mp.FS.mkdirTree("/lib");
if (!flash) {
  for (const f of fs.readdirSync(lib)) {
    if (f.endsWith(".py") && f !== "board.py" && f !== "main.py") mp.FS.writeFile("/lib/" + f, fs.readFileSync(path.join(lib, f)));
  }
}
mp.FS.writeFile("/lib/board.py", fs.readFileSync(path.join(here, "board.py")));

// The flash: copied in at boot, written back (mirrored) whenever the board syncs, resets or exits.
function loadTree(host, dir) {
  mp.FS.mkdirTree(dir);
  for (const e of fs.readdirSync(host, { withFileTypes: true })) {
    const h = path.join(host, e.name);
    if (e.isDirectory()) loadTree(h, dir + "/" + e.name);
    else if (e.isFile()) mp.FS.writeFile(dir + "/" + e.name, fs.readFileSync(h));
  }
}
function mirror(dir, host) {
  fs.mkdirSync(host, { recursive: true });
  const names = mp.FS.readdir(dir).filter((n) => n !== "." && n !== "..");
  for (const n of fs.readdirSync(host)) {
    if (!names.includes(n)) fs.rmSync(path.join(host, n), { recursive: true, force: true });
  }
  for (const n of names) {
    const p = dir + "/" + n;
    const h = path.join(host, n);
    if (mp.FS.isDir(mp.FS.stat(p).mode)) {
      if (fs.existsSync(h) && !fs.statSync(h).isDirectory()) fs.rmSync(h);
      mirror(p, h);
    } else {
      const data = mp.FS.readFile(p);
      if (fs.existsSync(h) && fs.statSync(h).isDirectory()) fs.rmSync(h, { recursive: true });
      let same = false;
      try { same = Buffer.from(data).equals(fs.readFileSync(h)); } catch (e) { same = false; }
      if (!same) {
        fs.writeFileSync(h + ".sync", data, { mode: 0o600 });
        fs.renameSync(h + ".sync", h);
      }
    }
  }
}
const writeBack = () => { if (flash) mirror("/flash", flash); };
// Power cut, once per flash and name (tests): the process ends without writing back what was not
// synced, and the test boots the board again.
const { cut: cutAt, cut_sync: cutSync, cut_on_change: watch = [] } = JSON.parse(params);
const cutPower = (name, what = "") => {
  if (fs.existsSync(flash + ".cut-" + name)) return;
  fs.writeFileSync(flash + ".cut-" + name, "");
  process.stdout.write("### power cut at " + name + what + "\n");
  process.exit(RESET_EXIT);
};
// The sweep (params.cut_sync, 0 = only count): every flash sync (each state write, rename or removal
// made durable) and every named point is a sweep point, numbered across boots in FLASH.syncs; the power
// is cut right after the Nth, so a test can cut after each step of a flow instead of at points named.
const sweepPoint = (what) => {
  if (!flash || cutSync === undefined) return;
  const f = flash + ".syncs";
  const n = (fs.existsSync(f) ? Number(fs.readFileSync(f, "utf8")) : 0) + 1;
  fs.writeFileSync(f, String(n));
  if (n === cutSync) cutPower("sync-" + n, " (after " + what + ")");
};
const onHost = (p) => { try { return fs.readFileSync(path.join(flash, p)).toString("hex"); } catch (e) { return null; } };
const watched = flash ? watch.map((p) => [p, onHost(p)]) : [];
globalThis.flashSync = () => {
  writeBack();
  for (const [p, was] of watched) if (onHost(p) !== was) cutPower("change", " (" + p + " changed)");
  sweepPoint("sync");
};
globalThis.powerCut = (name) => {
  if (!flash) return;
  if (name === cutAt) cutPower(name);
  sweepPoint(name);
};
globalThis.boardReset = () => { writeBack(); process.exit(RESET_EXIT); };

mp.globals.set("PARAMS_JSON", params);
const prelude = "import sys\nsys.path.insert(0, '/lib')\nimport json\nPARAMS = json.loads(PARAMS_JSON)\n";
try {
  if (flash) {
    loadTree(flash, "/flash");
    await mp.runPythonAsync(prelude + "import os\nos.chdir('/flash')\nsys.path.insert(1, '/flash')\n"
                            + "import loader\nawait loader.start()\n");
  } else {
    await mp.runPythonAsync(prelude + fs.readFileSync(script, "utf8"));
  }
  writeBack();
  process.exit(0);
} catch (e) {
  writeBack();
  process.stderr.write(String(e && e.message || e) + "\n");
  process.exit(1);
}
