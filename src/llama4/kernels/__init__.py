"""Fast paths apart from the model, as ggml is apart from llama.cpp: applied to a finished model from outside
(module swaps, an installed decode step), each tested against the model's own layers, which stay the
reference. ``cpu`` is the one backend today."""
