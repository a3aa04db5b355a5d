"""Training language models with MOPO: sequence log-probs, meshes and sharding rules, the train step, checkpoints."""
