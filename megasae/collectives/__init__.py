"""Collectives over a tensor-parallel group, and the latent-parallel SAE math built on them. Below the SAE
math (megasae.sae) and above the kernels (megasae.ops); nothing here knows a host model or peft."""
