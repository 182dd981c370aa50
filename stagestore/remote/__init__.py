"""Remotes (docs/remote.md): the storage interface and its backends (`storage`), a store's
remotes and the capability probe (`remotes`), push and pull (`transfer`), and verify and gc of a
remote (`audit`)."""
