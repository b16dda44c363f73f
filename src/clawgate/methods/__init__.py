"""RPC methods: one module per family; each registers `MethodSpec`s into the table."""
