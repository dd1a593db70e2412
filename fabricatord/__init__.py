"""fabricatord: a whole imaging department in one daemon, for integration testing."""

__version__ = "0.1.0"

# PS3.7 D.3.3.2: who wrote a file or opened an association. Under the root this project's
# releases use; never changes between versions (the version name does).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1438.1"
IMPLEMENTATION_VERSION_NAME = f"FABRICATORD_{__version__.replace('.', '')}"[:16]
