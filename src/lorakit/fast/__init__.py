"""Speed paths, each equal to a reference kept beside it and tested against it: the LoRA branch (branch), one autocast
cast per input (shared_cast), the gated-MLP activation (swiglu), output layer + cross-entropy in chunks (fused_ce)."""
