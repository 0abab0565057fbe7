"""From adapter to serving engine. problems (an engine's rules, checked on the config and tensors, each with its fix),
merged (base + adapter as one plain transformers folder), vllm (a PEFT folder vLLM accepts), gguf_names (module names
and layouts of llama.cpp's GGUF tensors), gguf_adapter (a llama.cpp LoRA adapter), gguf_merged (the merged model as
one GGUF file)."""
