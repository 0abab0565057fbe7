"""Storage formats of a frozen base: NF4 / int8 weights (formats), the layer computing with them (linear), 16-bit
embeddings (half), NF4 decoded by torch.compile (nf4_compiled). No model rewiring here: that is
lorakit.adapters.quantize."""
