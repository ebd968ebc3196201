"""Training: TrainModule hooks, the Trainer loop, its compiled steps, data, checkpoints, export."""
