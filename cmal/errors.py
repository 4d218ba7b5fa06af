"""The error of a run that stopped for a reason the user fixes outside the config (a full
disk, a run folder in use): the command line prints its one line and exits with 4.
(Bad configs are ``cmal.config.ConfigError``, bad data ``cmal.data.errors.DataError``.)"""


class RunError(RuntimeError):
    """One line, worded for the user: what stopped, what is kept, what to do."""

    exit_code = 4
