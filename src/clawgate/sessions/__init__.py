"""Sessions: keys, metadata (LRU-cached), transcripts (in the store)."""
