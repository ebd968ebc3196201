"""How a model is split: styles, plans, sharded init, optimizer state, activations, batches;
``infer/``: plan inference (``jtp.infer_plan``)."""
