"""The HL7 v2 codec (layer 2): messages built and parsed, MLLP framing; pure, no workflow."""
