"""Errors the CLI turns into a one-line message and exit code 2."""


class CompressorError(Exception):
    """A user-facing error: bad input, missing files, inconsistent artifacts."""


class DataError(CompressorError):
    """The data could not be found, detected or parsed, or is empty."""


class ArtifactError(CompressorError):
    """A model or artifact directory is missing files or is inconsistent."""
