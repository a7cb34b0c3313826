"""The PKCS#11 user PIN: read from a file that only the agent can read, never from the config.

Under systemd the PIN arrives as a credential (`LoadCredential=pkcs11-pin:...`), which systemd
exposes in $CREDENTIALS_DIRECTORY with mode 0400 to this service alone. Elsewhere the config may
name a file. A file readable by group or others is refused rather than used: the PIN guards the
device identity, and a leaked PIN lets any local user sign as the device.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from agent.base.config import Config
from agent.base.errors import SecretError

CREDENTIAL_NAME = "pkcs11-pin"
MAX_PIN_BYTES = 256


def pin_path(cfg: Config, environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        p = Path(creds) / CREDENTIAL_NAME
        if p.exists() or cfg.pkcs11.pin_file is None:
            return p
    if cfg.pkcs11.pin_file is not None:
        return cfg.resolve(cfg.pkcs11.pin_file)
    raise SecretError(
        "pkcs11 PIN: no PIN file; set pkcs11.pin_file in the config or run under systemd with "
        f"LoadCredential={CREDENTIAL_NAME}:PATH"
    )


def read_pin(cfg: Config, environ: dict[str, str] | None = None) -> str:
    """Return the PIN, after checking the file is private to this user.

    Opened without following a symbolic link and without blocking (O_NONBLOCK), and checked with fstat
    before any read: a FIFO, device or socket put where the PIN file belongs is refused, never waited on.
    No error message contains the PIN or any byte read from the file."""
    p = pin_path(cfg, environ)

    def not_regular(kind: str) -> SecretError:
        return SecretError(
            f"{p}: PIN file is not a regular file ({kind}); point pkcs11.pin_file (or the "
            "credential) at a file holding only the PIN, mode 600"
        )

    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretError(
            f"{p}: PIN file not found; create it with mode 600 (umask 077; printf %s PIN > {p})"
        ) from None
    except PermissionError:
        raise SecretError(
            f"{p}: PIN file not readable by this user; make the agent's user its owner, mode 600"
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink where a private file was expected
            raise SecretError(f"{p}: PIN file is a symbolic link; point the config at the real file") from None
        if e.errno == errno.ENXIO:  # a socket
            raise not_regular("a socket") from None
        raise SecretError(f"{p}: cannot open the PIN file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kinds = {
                stat.S_IFIFO: "a FIFO",
                stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device",
                stat.S_IFDIR: "a directory",
                stat.S_IFSOCK: "a socket",
            }
            raise not_regular(kinds.get(stat.S_IFMT(st.st_mode), "not a file"))
        if st.st_mode & 0o077:
            raise SecretError(
                f"{p}: PIN file mode {stat.S_IMODE(st.st_mode):04o} lets group or others read it; "
                f"run `chmod 600 {p}` (and change the PIN if others may have read it)"
            )
        raw = b""
        while len(raw) <= MAX_PIN_BYTES:  # a regular file: reads return at once, short only at the end
            chunk = os.read(fd, MAX_PIN_BYTES + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except OSError as e:
        raise SecretError(f"{p}: cannot read the PIN file ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_PIN_BYTES:
        raise SecretError(f"{p}: PIN file is longer than {MAX_PIN_BYTES} bytes; it should hold the PIN only")
    try:
        pin = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise SecretError(f"{p}: PIN file is not UTF-8 text") from None
    if not pin:
        raise SecretError(f"{p}: PIN file is empty; write the token's user PIN into it")
    return pin
