"""A simulated engine backend for scale experiments: continuous batching on a cost model, no model.

    backend = SimulatedEngineBackend.from_profile("sim:a100-13b", name="sim-0", time_scale=0.1)

Modules: cost.py (what a step costs), presets.py (named, calibrated engines),
contexts.py (the context tree and its KV), scheduler.py (which jobs a step advances),
engine.py (the step loop and the simulated clock), calibrate.py (measures the built-in engine),
backend.py (the EngineBackend: text, forks, shared prefixes).
"""

from parrot.backends.simulated.backend import SimulatedEngineBackend
from parrot.backends.simulated.engine import SimulatedStats
from parrot.backends.simulated.cost import CostModel, StepShape
from parrot.backends.simulated.presets import PRESETS, EngineProfile, parse_engine_spec

__all__ = ["PRESETS", "CostModel", "EngineProfile", "SimulatedEngineBackend", "SimulatedStats", "StepShape", "parse_engine_spec"]
