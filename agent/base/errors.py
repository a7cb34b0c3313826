"""Exceptions whose message is the one line a user sees.

Every error the agent reports to a person derives from AgentError, so the CLI can print
`str(err)` alone (no traceback) and exit non-zero. Messages name the field or file, what is
wrong and what to do; they never contain a PIN, key or token.
"""


class AgentError(Exception):
    """A problem the user can act on; str() is the whole message."""

    exit_code = 1


class ConfigError(AgentError):
    """The configuration is unusable; carries every problem found, one line each."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class SecretError(AgentError):
    """A secret (the PKCS#11 PIN) is missing or stored unsafely."""

    exit_code = 2


class StateError(AgentError):
    """The state file cannot be trusted; it is left untouched for the user to inspect."""

    exit_code = 3


class KeystoreError(AgentError):
    """The PKCS#11 token could not do what was asked."""


class ClockError(AgentError):
    """The clock could not be trusted within the allowed wait."""


class BrokerConnectionError(AgentError):
    """The broker connection could not be made or was refused."""


class CredentialError(AgentError):
    """The token refused the PIN or lacks the key: retrying cannot help (and would lock a TPM out).

    Exit status 2 like a config error, so a service manager told not to restart on 2 stops here.
    """

    exit_code = 2
