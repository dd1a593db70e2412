"""The DICOM upper layer (PS3.8) as our own code: PDUs, negotiation, the state machine, DIMSE
message assembly. It knows DICOM and no workflow, and costs no thread per connection."""
