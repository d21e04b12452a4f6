"""The data layer's error: a file that is missing, corrupt, or not what the manifest says."""


class DataError(ValueError):
    """A data file is missing, corrupt, or not what the manifest says; names the volume id."""
