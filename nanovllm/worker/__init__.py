"""One model replica per tensor-parallel rank: KV cache, step inputs, CUDA graphs, forward."""
