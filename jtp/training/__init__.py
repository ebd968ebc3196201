"""Training: TrainModule hooks, the precision policy, the pure steps and their compile
(no Trainer needed), evaluation, and the Trainer loop with its policy, logs and signals."""
