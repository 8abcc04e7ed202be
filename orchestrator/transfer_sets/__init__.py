"""Transfer-set sources (a plug-in kind): base (the registry, target_unlabeled), pools (generic), retrieval.
Imports: stages, data, models, ray_adapters and the foundation (registry, ids, storage, cache, config)."""
