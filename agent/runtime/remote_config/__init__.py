"""Configuration by shadow (see overlay.py): the cloud sets a documented subset of the config, live."""
