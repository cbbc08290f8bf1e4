"""Building, inspecting and generating webdataset shards (the logic behind shards/*.py)."""
