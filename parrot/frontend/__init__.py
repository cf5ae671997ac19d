"""What application programs import: semantic functions, variables, runtimes."""
