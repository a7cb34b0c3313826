#!/usr/bin/env bash
# Installs the system packages the agent's demo and tests need, only when missing.
#
# Why two kinds of install: libraries and tools that start no service are installed with apt-get;
# daemons whose Debian package would start or replace a system service (mosquitto starts a broker on
# port 1883, chrony removes systemd-timesyncd) are unpacked into a project-local folder instead, so
# the developer's machine is left alone. The unpacked binaries are found through BED_SYSROOT.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
sysroot=${BED_SYSROOT:-$here/.deps/sysroot}

apt_pkgs=(
  make openssl ca-certificates gcc libc6-dev
  libssl-dev  # OpenSSL headers and libcrypto.so: the broker plugin reads client certificates (JITP)
  softhsm2
  swtpm libtpm2-pkcs11-1 libtss2-tcti-swtpm0 tpm2-tools opensc
  systemd  # systemd-analyze: the unit files are verified and scored in the tests
  debootstrap systemd-container  # a Debian root file system booted with systemd-nspawn in the tests
  openssh-client  # ssh, scp and ssh-keygen: the secure-tunneling tests log in to the unpacked sshd
  # runtime libraries of the unpacked mosquitto and chrony
  libcjson1 libdlt2 libwrap0 libcap2 libsystemd0 libssl3
  libedit2 libgnutls30 libnettle8 libseccomp2
  # runtime libraries of the unpacked sshd (ldd usr/sbin/sshd; libwrap0, libsystemd0 and libssl3 above)
  libpam0g libaudit1 libcrypt1 libselinux1 libgssapi-krb5-2 libkrb5-3 libcom-err2 zlib1g
)
# mosquitto-dev and libmosquitto-dev only carry headers, for the local cloud's broker plugin.
# openssh-server's package would start sshd on port 22 (scp's sftp is sshd's own internal-sftp).
unpacked_pkgs=(mosquitto mosquitto-dev libmosquitto-dev chrony openssh-server)

# make check-arm64 runs arm64 programs through qemu-user (and a test checks it leaves the host clean).
if [ "$(uname -m)" = x86_64 ]; then
  apt_pkgs+=(qemu-user-static)
fi

# The MicroPython edition's tests run the real interpreter (WebAssembly) under Node.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_pkgs+=(nodejs npm)
fi

# Debian's python3 has no venv module until python3-venv is installed.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt_pkgs+=(python3-venv python3-pip)
fi

sudo_=()
if [ "$(id -u)" -ne 0 ]; then sudo_=(sudo); fi

missing=()
for p in "${apt_pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

updated=0
apt_update() {
  if [ "$updated" -eq 0 ]; then
    "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    updated=1
  fi
}

if [ ${#missing[@]} -gt 0 ]; then
  echo "sysdeps: installing ${missing[*]}"
  apt_update
  "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$sysroot"
for p in "${unpacked_pkgs[@]}"; do
  stamp="$sysroot/.$p.unpacked"
  [ -f "$stamp" ] && continue
  echo "sysdeps: unpacking $p into $sysroot (not installed as a service)"
  apt_update
  tmp=$(mktemp -d); chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -q "$p" >/dev/null 2>&1) || (cd "$tmp" && apt-get download "$p")
  dpkg -x "$tmp"/"$p"_*.deb "$sysroot"
  rm -rf "$tmp"
  touch "$stamp"
done

# sshd started as root (the tests run as root) refuses to run without its privilege separation user,
# `sshd`, and OpenSSH 7.5 removed the option that turned privilege separation off; openssh-server's
# postinst would create the same user. A lasting change, but a system user with no home and no shell
# that nothing can log in as. (The directory sshd also needs, /run/sshd, is on a tmpfs: localcloud/sshd.py
# creates it when missing.)
if ! getent passwd sshd >/dev/null; then
  echo "sysdeps: adding the system user sshd (sshd's privilege separation)"
  "${sudo_[@]}" useradd --system --no-create-home --home-dir /run/sshd --shell /usr/sbin/nologin --gid nogroup sshd
fi

for b in mosquitto chronyd sshd; do
  if ! ls "$sysroot"/usr/sbin/$b >/dev/null 2>&1; then
    echo "sysdeps: $b missing from $sysroot after unpacking" >&2
    exit 1
  fi
done
# Unpacked binaries link against host libraries apt_pkgs installs: a missing one fails here, not in a test.
unresolved=$(ldd "$sysroot"/usr/sbin/sshd 2>&1 | grep 'not found' || true)
if [ -n "$unresolved" ]; then
  echo "sysdeps: sshd misses libraries (add their packages to apt_pkgs): $unresolved" >&2
  exit 1
fi
echo "sysdeps: ok"
