"""The HH-RLHF comparison: configs, the method registry and the stages (data, preference models, training,
evaluation)."""
