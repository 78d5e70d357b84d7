"""Hugging Face interop: safetensors/GGUF import into our checkpoints, and export back."""
