"""What the manager drives: the built-in engine, other servers, a simulated engine."""
