"""The device side of the engine: LLMEngine (engine.py), the shape-bucketed runner and jitted
step (runner.py), on-device sampling (sampler.py), and the attention-backend choice (attention.py)."""
