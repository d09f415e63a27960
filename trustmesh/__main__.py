from trustmesh.cli.main import entrypoint

entrypoint()
