"""Offline demo material: the demo pool and its sources, demo tasks, the SimCLR stand-in teacher, the demo zoo.
Imports: stages, zoo, models, data and the foundation; only the entry points (cli, the package API) import it."""
