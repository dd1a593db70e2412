"""What knows DICOM but no workflow: SCU operations, the file layout and the atomic writer (layer 3)."""
