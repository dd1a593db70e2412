"""fabricatord: a whole imaging department in one daemon, for integration testing."""

__version__ = "0.1.0"
