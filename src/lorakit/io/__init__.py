"""Files and names, at the bottom of the import order: the adapter folder format (files), resolving a model id
(models)."""
