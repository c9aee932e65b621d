"""The DSPy program and its measurement: ResearchHop, recall, dspy.Evaluate, adapters, the LM set-up (04, 05)."""
