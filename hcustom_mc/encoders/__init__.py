"""Condition encoders: LLaVA text-image fusion and CLIP-L text (text.py), Whisper audio (audio.py), the causal 3D VAE (vae.py)."""
