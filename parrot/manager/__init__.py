"""The serve core: sessions, the semantic-variable graph, objective deduction, execution."""
