"""The wire protocol: frame shapes, method parameter schemas, encoding and decoding (pure, no I/O)."""
