"""The changes a person makes to the pool: the named changes (`ops`: add, remove, use,
enable, ...) and the TypeScript plugin's encrypted backup (`backup`). The CLI runs them
through a store, the proxy's commands through its save loop."""
