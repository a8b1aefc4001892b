"""blocksnap: incremental, deduplicated, point-in-time snapshots of VM disk images.

The Python API is :class:`blocksnap.api.Client`; errors are in :mod:`blocksnap.errors`.
"""
__version__ = "0.1.0"
