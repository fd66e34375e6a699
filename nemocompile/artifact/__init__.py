"""The artifact: its manifest (the exporter/runtime contract) and the files it records."""
