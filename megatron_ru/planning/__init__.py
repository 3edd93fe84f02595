"""Planning before launch: activation memory (activations.py), its measurement (measure.py), and the planner."""
