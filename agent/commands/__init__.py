"""AWS IoT Device Management Commands: run the actions the config names, when the cloud asks."""
