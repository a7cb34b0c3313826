"""Secure tunneling, destination side: remote access into the gateway through AWS IoT secure tunneling."""
