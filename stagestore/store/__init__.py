"""The local store (docs/format.md): the one durable-write seam (`durable`), names to paths
(`layout`), locks, objects, trees, manifests and the cache index, the stat cache, `Store` that
bundles them, and the JSON Schemas of the records.  Knows nothing of pipelines or runs."""
