"""Synthetic patients, identifiers, UIDs, modality templates, pixels and the study builder (layer 2).

Pure: counters, existing patients, the clock and the random source come in as arguments.
"""
