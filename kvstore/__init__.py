"""KV cache snapshots: the in-memory state, the safe file format, codecs and pruning.

Knows tensors, bytes and files only; never imports transformers or textual.
"""
