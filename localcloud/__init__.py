"""localcloud: a local stand-in for AWS IoT Core's device-facing side, for tests and a sandbox.

It runs real parts (mosquitto with TLS and client certificates, SoftHSM or swtpm tokens, chrony
as an NTP server) on loopback in a folder of its own. It is a development bench, never a
production backend.
"""
