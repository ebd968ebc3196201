"""How a model is split: styles, plans, sharded init, optimizer state, activations, batches."""
