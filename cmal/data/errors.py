"""The error raised for bad input data."""


class DataError(ValueError):
    """Bad input data, worded for the user: names the file, record or sample and field."""
