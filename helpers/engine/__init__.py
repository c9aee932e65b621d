"""CPU machinery a learner may skip: the embedded SmolLM2 engine behind ``dspy.LM`` (decode loop, caches, kernels)."""
