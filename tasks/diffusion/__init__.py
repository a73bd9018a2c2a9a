"""Diffusion plugins: Chunk-GRPO / Flow-GRPO on the denoiser, FIND on the initial noise."""
