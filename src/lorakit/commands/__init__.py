"""What the CLI verbs do, as functions: generate, evaluate, merge, info, demo (lorakit.cli only parses and prints)."""
