"""Load a causal LM, generate step by step, and capture what it does at each step and layer.

Never imports textual.
"""
