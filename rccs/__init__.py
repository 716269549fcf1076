"""rccs: a self-hosted real-time coordination server for one user's many devices."""

__version__ = "0.1.0"
