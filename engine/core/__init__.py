"""The engine core, on the device thread: the loop that owns the device (engine_core), the
scheduler that plans each step (scheduler), the runner that assembles the batch tensors
and runs the model (runner), its captured decode step (graphs), the KV store and the
prefix cache (kvstore, prefix), sampling (sampler), output processing (output) and the
engine's figures (stats). Importing the package loads nothing."""
