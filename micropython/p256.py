# NIST P-256 ECDSA for MicroPython (also runs under CPython): key generation, RFC 6979 signing,
# verification, PKCS#10 CSRs, SEC1 private keys and SubjectPublicKeyInfo / certificate parsing.
#
# Not constant-time, and it cannot be made so here: MicroPython big ints are heap-allocated
# variable-length numbers whose multiply, reduce and compare take time that depends on the values,
# and the interpreter gives no way to select without branching. Timing and power leak information
# about d and k to an attacker who can measure them closely; k is at least never drawn from a weak
# RNG (RFC 6979).
import hashlib
import binascii

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
     0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)

# DER of AlgorithmIdentifier {id-ecPublicKey, prime256v1}, of prime256v1 alone, of ecdsa-with-SHA256
_ALG = b"\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07"
_CURVE = _ALG[11:]
_ECDSA256 = b"\x30\x0a\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02"


# Jacobian coordinates (X, Y, Z) stand for (X/Z^2, Y/Z^3); Z == 0 is the point at infinity.
def _dbl(X, Y, Z):
    if not Z:
        return X, Y, Z
    d = Z * Z % P
    g = Y * Y % P
    b = X * g % P
    a = 3 * (X - d) * (X + d) % P  # a = -3
    X3 = (a * a - 8 * b) % P
    return X3, (a * (4 * b - X3) - 8 * g * g) % P, ((Y + Z) * (Y + Z) - g - d) % P


def _add(X, Y, Z, x, y):
    # Jacobian + affine (x, y)
    if not Z:
        return x, y, 1
    zz = Z * Z % P
    h = (x * zz - X) % P
    r = (y * zz * Z - Y) % P
    if not h:
        return _dbl(X, Y, Z) if not r else (1, 1, 0)
    hh = h * h % P
    hhh = h * hh % P
    v = X * hh % P
    X3 = (r * r - hhh - 2 * v) % P
    return X3, (r * (v - X3) - Y * hhh) % P, Z * h % P


def _sqm(a, e, m):
    r = 1
    while e:
        if e & 1:
            r = r * a % m
        a = a * a % m
        e >>= 1
    return r


# 3-argument pow is a build option (MICROPY_PY_BUILTINS_POW3): on in the WebAssembly port, esp32 and rp2,
# left out of some small builds, where pow() then refuses a third argument
try:
    _pow = pow if pow(3, 3, 5) == 2 else _sqm
except (TypeError, NotImplementedError):
    _pow = _sqm


def _inv(a, m):
    return _pow(a, m - 2, m)  # P and N are prime (Fermat)


def _affine(X, Y, Z):
    if not Z:
        return None
    z = _inv(Z, P)
    zz = z * z % P
    return X * zz % P, Y * zz * z % P


def _mul2(u, v=0, Q=None):
    # u*G + v*Q, one pass over the bits (Shamir's trick); Q affine; returns affine or None
    T = (None, G, Q, Q and _affine(*_add(G[0], G[1], 1, Q[0], Q[1])))
    X, Y, Z = 1, 1, 0
    i = 255
    while i >= 0:
        X, Y, Z = _dbl(X, Y, Z)
        t = T[(u >> i & 1) | (v >> i & 1) << 1]
        if t:
            X, Y, Z = _add(X, Y, Z, t[0], t[1])
        i -= 1
    return _affine(X, Y, Z)


def _int(b):
    return int.from_bytes(b, "big")


def _b32(x):
    return x.to_bytes(32, "big")


def _point(pub):
    # 65-byte uncompressed point -> (x, y) on the curve, else ValueError
    if len(pub) != 65 or pub[0] != 4:
        raise ValueError("not an uncompressed P-256 point")
    x = _int(pub[1:33])
    y = _int(pub[33:])
    if x >= P or y >= P or (y * y - x * x * x + 3 * x - B) % P:
        raise ValueError("point not on P-256")
    return x, y


def _pub(pt):
    return b"\x04" + _b32(pt[0]) + _b32(pt[1])


def keygen(rand):
    while True:
        d = _int(rand(32))
        if 0 < d < N:
            return d, _pub(_mul2(d))


def _hmac(k, m):
    k = k + bytes(64 - len(k))
    return hashlib.sha256(bytes(c ^ 0x5C for c in k) + hashlib.sha256(bytes(c ^ 0x36 for c in k) + m).digest()).digest()


def sign(d, digest):
    if len(digest) != 32 or not 0 < d < N:
        raise ValueError("need a 32-byte digest and a P-256 private key")
    e = _int(digest)
    # RFC 6979 section 3.2; qlen == hlen == 256, so bits2int is a plain conversion
    x = _b32(d) + _b32(e % N)
    V = b"\x01" * 32
    K = _hmac(bytes(32), V + b"\x00" + x)
    V = _hmac(K, V)
    K = _hmac(K, V + b"\x01" + x)
    V = _hmac(K, V)
    while True:
        V = _hmac(K, V)
        k = _int(V)
        if 0 < k < N:
            r = _mul2(k)[0] % N
            s = _inv(k, N) * (e + r * d) % N
            if r and s:
                return _seq(_der_int(r) + _der_int(s))
        K = _hmac(K, V + b"\x00")
        V = _hmac(K, V)


def verify(pub, digest, sig_der):
    try:
        Q = _point(pub)
        if len(digest) != 32:
            return False
        e = _int(digest)
        r, s = _sig(sig_der)
    except (ValueError, TypeError):
        return False
    w = _inv(s, N)
    R = _mul2(e * w % N, r * w % N, Q)
    return R is not None and R[0] % N == r


# --- DER ---

def _tlv(tag, body):
    n = len(body)
    if n < 128:
        h = bytes((tag, n))
    elif n < 256:
        h = bytes((tag, 0x81, n))
    else:
        h = bytes((tag, 0x82, n >> 8, n & 255))
    return h + body


def _seq(body):
    return _tlv(0x30, body)


def _der_int(x):
    b = x.to_bytes(33, "big")
    i = 0
    while i < 32 and not b[i] and b[i + 1] < 0x80:
        i += 1
    return _tlv(2, b[i:])


def _next(b, i, end):
    # the element at b[i:end] -> (tag, content start, content end); ValueError if malformed
    if i + 2 > end:
        raise ValueError("truncated DER")
    t = b[i]
    n = b[i + 1]
    i += 2
    if n & 0x80:
        c = n & 0x7F
        if not 0 < c < 4 or i + c > end:
            raise ValueError("bad DER length")
        n = _int(b[i:i + c])
        i += c
    if i + n > end:
        raise ValueError("truncated DER")
    return t, i, i + n


def _enter(b, i, end, tag):
    t, s, e = _next(b, i, end)
    if t != tag:
        raise ValueError("unexpected DER tag")
    return s, e


def _sig(b):
    s, e = _enter(b, 0, len(b), 0x30)
    if e != len(b):
        raise ValueError("trailing bytes")
    out = []
    for _ in (0, 1):
        i, s = _enter(b, s, e, 2)
        if i == s or b[i] & 0x80:
            raise ValueError("bad INTEGER")
        x = _int(b[i:s])
        if not 0 < x < N:
            raise ValueError("out of range")
        out.append(x)
    if s != e:
        raise ValueError("trailing bytes")
    return out


def _spki(b, i, end):
    s, e = _enter(b, i, end, 0x30)
    z = _enter(b, s, e, 0x30)[1]
    if b[s:z] != _ALG:
        raise ValueError("not a P-256 (prime256v1) EC public key")
    s, e = _enter(b, z, e, 3)
    if e - s != 66 or b[s]:
        raise ValueError("not an uncompressed P-256 point")
    pub = bytes(b[s + 1:e])
    _point(pub)
    return pub


def pem(label, der):
    out = "-----BEGIN %s-----\n" % label
    for i in range(0, len(der), 48):
        out += binascii.b2a_base64(der[i:i + 48]).decode()
    return out + "-----END %s-----\n" % label


def unpem(text, label):
    if isinstance(text, (bytes, bytearray)):
        text = text.decode()
    a = "-----BEGIN %s-----" % label
    i = text.find(a)
    j = text.find("-----END %s-----" % label, i)
    if i < 0 or j < 0:
        raise ValueError("no PEM " + label)
    return binascii.a2b_base64("".join(text[i + len(a):j].split()).encode())


def pub_from_spki_pem(text):
    b = unpem(text, "PUBLIC KEY")
    return _spki(b, 0, len(b))


def pub_from_cert_pem(text):
    return pub_from_cert_der(unpem(text, "CERTIFICATE"))


def pub_from_cert_der(b):
    s, e = _enter(b, 0, len(b), 0x30)
    if e != len(b):
        raise ValueError("trailing bytes")
    s, e = _enter(b, s, e, 0x30)  # tbsCertificate
    if _next(b, s, e)[0] == 0xA0:  # [0] version
        s = _next(b, s, e)[2]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        s = _next(b, s, e)[2]
    return _spki(b, s, e)


def csr_der(d, pub, common_name):
    cn = common_name.encode() if isinstance(common_name, str) else common_name
    name = _seq(_tlv(0x31, _seq(b"\x06\x03\x55\x04\x03" + _tlv(0x0C, cn))))
    info = _seq(b"\x02\x01\x00" + name + _seq(_ALG + _tlv(3, b"\x00" + pub)) + b"\xa0\x00")
    sig = sign(d, hashlib.sha256(info).digest())
    return _seq(info + _ECDSA256 + _tlv(3, b"\x00" + sig))


def key_der(d, pub):
    return _seq(b"\x02\x01\x01" + _tlv(4, _b32(d)) + _tlv(0xA0, _CURVE) + _tlv(0xA1, _tlv(3, b"\x00" + pub)))
