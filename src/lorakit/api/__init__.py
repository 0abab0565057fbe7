"""HF PEFT's public surface: PeftModel and its task classes (peft_model), AutoPeftModel* (auto), PEFT's module-level
helpers (functions)."""
