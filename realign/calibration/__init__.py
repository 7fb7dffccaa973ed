"""Shared by every data-driven method (NLSR, SaLoRA, training): examples, prompt encoding with the
chat template, the shared-prefix cache, and Gram taps on module inputs and outputs."""
