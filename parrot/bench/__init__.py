"""`parrot bench`: the paper's workloads, Parrot against request-level serving, in one run."""
