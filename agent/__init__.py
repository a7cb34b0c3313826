"""iot-agent: a security-first device agent for AWS IoT Core."""

__version__ = "0.1.0"
