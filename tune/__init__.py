"""The search: `python tune/search.py` (the main job) and its space; importable as `tune.search`, `tune.space`."""
