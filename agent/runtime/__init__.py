"""The service: the daemon that runs the enabled features over a session, and `iot-agent status`."""
