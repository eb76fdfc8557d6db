"""The built-in tiny model's research: the synthetic shapes it is trained on (shapes.py), its
training and evaluation (train.py) and the probes of what its layers know (probe.py).

This package imports the engine; the engine never imports it. The engine only loads the
committed weights (engine/tiny_weights.safetensors). The training log is in README.md here."""
