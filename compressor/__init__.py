"""recsys-compressor: compress a transformer recommender and export it for serving."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recsys-compressor")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
