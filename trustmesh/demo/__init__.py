"""`trustmesh demo`: a local mesh of three agents, an impostor and an OTLP receiver."""
