"""ml_collections config files, loaded by path: `--config=configs/<name>.py[:arg]`."""
