"""Protocol servers: the DICOM node, later the MLLP listener and the web console (layer 5)."""
