"""The `trustmesh` command line."""
