// Runs a MicroPython script under the real MicroPython interpreter (WebAssembly) with the board's
// platform layer supplied by Node: TLS sockets (node:tls) instead of socket+ssl.
//   node harness/run.mjs SCRIPT.py [JSON params]      (the params are the global PARAMS in the script)
// Every .py file in micropython/ is copied into the interpreter's file system and importable.
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";
import fs from "node:fs";
import path from "node:path";
import tls from "node:tls";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const lib = path.resolve(here, "..");

globalThis.tlsOpen = (host, port, caPath, certPath, keyPath) => new Promise((resolve, reject) => {
  const chunks = [];
  let waiting = null;
  let closed = false;
  const s = tls.connect({ host, port, servername: host, ca: fs.readFileSync(caPath),
                          cert: fs.readFileSync(certPath), key: fs.readFileSync(keyPath),
                          minVersion: "TLSv1.2" }, () => resolve({
    write: (u8) => { s.write(Buffer.from(u8)); },
    read: () => new Promise((r) => {
      if (chunks.length) r(chunks.shift());
      else if (closed) r(new Uint8Array(0));
      else waiting = r;
    }),
    close: () => s.end(),
  }));
  const wake = (u) => { if (waiting) { const w = waiting; waiting = null; w(u); } else chunks.push(u); };
  s.on("data", (d) => wake(new Uint8Array(d)));
  s.on("end", () => { closed = true; if (waiting) wake(new Uint8Array(0)); });
  s.on("close", () => { closed = true; if (waiting) wake(new Uint8Array(0)); });
  s.on("error", (e) => { if (!closed) reject(e); closed = true; if (waiting) wake(new Uint8Array(0)); });
});

const [script, params = "{}"] = process.argv.slice(2);
const mp = await loadMicroPython({ stdout: (l) => process.stdout.write(l + "\n"), stderr: (l) => process.stderr.write(l + "\n"),
                                   linebuffer: true });
mp.FS.mkdirTree("/lib");
for (const f of fs.readdirSync(lib)) {
  if (f.endsWith(".py")) mp.FS.writeFile("/lib/" + f, fs.readFileSync(path.join(lib, f)));
}
mp.globals.set("PARAMS_JSON", params);
try {
  await mp.runPythonAsync("import sys\nsys.path.insert(0, '/lib')\nimport json\nPARAMS = json.loads(PARAMS_JSON)\n"
                          + fs.readFileSync(script, "utf8"));
  process.exit(0);
} catch (e) {
  process.stderr.write(String(e && e.message || e) + "\n");
  process.exit(1);
}
