"""Exception types shared by every module (the bottom of the import graph)."""


class KilnError(Exception):
    """Base class for errors KilnProxy raises on purpose."""


class ConfigError(KilnError):
    """The configuration file or a command-line argument is invalid (exit status 2)."""


class KeyStoreError(KilnError):
    """A key cannot be parsed, stored or found (exit status 2 from the CLI)."""


class DuplicateKeyError(KeyStoreError):
    """The key is already stored."""


class KeyStoreUnavailable(KeyStoreError):
    """The key store cannot be opened, read or written (missing, locked, corrupt, unreachable): exit status 1 from
    the CLI, not 2, since the command itself was fine."""


class SchemaTooNewError(KeyStoreError):
    """The key store's schema is newer than this code knows (exit status 2: upgrade KilnProxy)."""


class CommandRejected(KilnError):
    """The client's exec command is not allowed; the message is safe to show the client."""


class BackendUnavailable(KilnError):
    """The backend could not be reached, did not answer in time or failed host-key checks."""
