"""Pure tensor maths, tested against dense references: initializers with LoftQ (init), DoRA (dora), the task-tensor
merges of add_weighted_adapter (merge_math)."""
