"""Training: the backward conventions, the data, and fine-tuning on the ``("dp", ...)`` mesh."""
