"""RealDGen pipelines: manifests, storage, Ray Data generation job, training entry, downstream tools."""
