"""The floor for bench/startup.py: import awscrt and awsiot, open one PKCS#11 mTLS connection.

Nothing else: no config, no clock gate, no logging setup. Prints 'connected' when the CONNACK
arrives, then waits for SIGTERM and stops cleanly (like the agent).
"""

import signal
import sys
import threading
from pathlib import Path

import awscrt.io
from awsiot import mqtt5_client_builder

endpoint, port, ca, cert, lib_path, token, key, pin_file = sys.argv[1:9]
pin = Path(pin_file).read_text().strip()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
lib = awscrt.io.Pkcs11Lib(file=lib_path, behavior=awscrt.io.Pkcs11Lib.InitializeFinalizeBehavior.STRICT)
stopped = threading.Event()
client = mqtt5_client_builder.mtls_with_pkcs11(
    pkcs11_lib=lib,
    user_pin=pin,
    token_label=token,
    private_key_label=key,
    cert_filepath=cert,
    endpoint=endpoint,
    port=int(port),
    ca_filepath=ca,
    client_id=sys.argv[9],
    on_lifecycle_connection_success=lambda d: print("connected", file=sys.stderr, flush=True),
    on_lifecycle_stopped=lambda d: stopped.set(),
)
client.start()
stop.wait()
client.stop()
stopped.wait(10)
