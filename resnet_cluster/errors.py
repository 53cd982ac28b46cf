"""User-facing errors.

Everything a user can get wrong (a bad job field, a missing dataset, an unreachable cluster)
raises a :class:`UserError`. The CLI prints its message as one paragraph and exits with code 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user can fix. ``str(err)`` is the whole message."""

    exit_code = 2


class ConfigError(UserError):
    """A job file or ``--set`` override that does not validate."""


class DataError(UserError):
    """A dataset that is missing, unreadable or in the wrong format."""


class StoreError(UserError):
    """An artifact store or run that cannot be read or written as asked."""


class ClusterError(UserError):
    """A Ray cluster that cannot be reached or refuses the job."""


class DeviceError(UserError):
    """A device the job asks for that this machine cannot give (no usable CUDA)."""
