"""The DICOM node on the reactor: the listener, and one module per service."""

from fabricatord.servers.dicom.node import DicomNode

__all__ = ["DicomNode"]
