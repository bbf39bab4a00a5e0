"""The other conversions (HF <-> TorchTitan, vLLM merged views, per-layer JAX arrays, nanoGPT -> HF), one module each."""
