"""The training loop (trainer: setup / fit / train_step / finish) and its parts: args, loss, checkpoint, metrics,
precision, distributed."""
