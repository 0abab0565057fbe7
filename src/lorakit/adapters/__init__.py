"""The engine. Module kinds (kinds: linear, embedding; their shared part in layer) and variants (variants: LoRA,
DoRA) as tables; modules_to_save; inject (targets, wrapping, unwrapping); model (LoraModel and its verbs); mixed_batch;
combine; convert; quantize (rewiring onto lorakit.quant); state (an adapter's tensors and their file keys)."""
