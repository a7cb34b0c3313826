"""What every capability shares: the config loader, errors, the state store and atomic writes, backoff, log
formatting, service notifications, the PIN, and the test-only kill/fail points.
"""
