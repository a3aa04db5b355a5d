"""Where arrays live: the device mesh and the placement of parameters and batches on it (:mod:`.sharding`), and the
multi-process job (:mod:`.distributed`).

The lowest floor above JAX itself: storage, models, evaluation and the trainer import it; it imports none of them
(nor orbax), so reading a file or placing a model never loads the training stack.
"""
