"""Training data: files -> records (records) -> label-masked token ids (tokenize) -> packed rows and batches (pack)."""
