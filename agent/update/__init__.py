"""Signed updates: documents, signatures and manifests, downloads (HTTPS and MQTT streams), release slots, the
OTA job handler, the root helper and the self-update launcher.
"""
