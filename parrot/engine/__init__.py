"""The built-in engine: a Llama-family model in PyTorch over a paged, forkable KV cache."""
