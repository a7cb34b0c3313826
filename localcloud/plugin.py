"""Build the broker plugin (plugin/localcloud_route.c) against the unpacked mosquitto headers."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from . import procs

SOURCE = Path(__file__).resolve().parent / "plugin" / "localcloud_route.c"


def build(out_dir: Path | None = None) -> Path:
    """Compile the plugin once per source change; returns the .so path."""
    out_dir = out_dir or (procs.REPO / ".deps" / "plugin")
    out_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / "localcloud_route.so"
    if so.exists() and so.stat().st_mtime >= SOURCE.stat().st_mtime:
        return so
    include = procs.sysroot() / "usr" / "include"
    if not (include / "mosquitto_broker.h").exists():
        raise FileNotFoundError(f"{include}/mosquitto_broker.h missing; run scripts/sysdeps.sh")
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise FileNotFoundError("no C compiler; run scripts/sysdeps.sh (package gcc)")
    if not Path("/usr/include/openssl/x509.h").exists():
        # The plugin reads client certificates (just-in-time provisioning): OpenSSL's headers and libcrypto.so.
        raise FileNotFoundError("/usr/include/openssl/x509.h missing; run scripts/sysdeps.sh (package libssl-dev)")
    # Per process: pytest-xdist workers on a fresh checkout build it at the same time, and each
    # renames only its own complete file into place.
    tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Werror",
            "-I",
            str(include),
            "-o",
            str(tmp),
            str(SOURCE),
            "-lcrypto",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    tmp.replace(so)
    return so
