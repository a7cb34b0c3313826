"""A connection to AWS IoT: the clock gate (no TLS before the clock is trusted) and the MQTT 5 connection over
mutual TLS with the key on the token.
"""
