"""FHIR R4B: a stored study as a transaction Bundle (ImagingStudy, Patient, ServiceRequest),
and the client that POSTs it to a FHIR server."""
