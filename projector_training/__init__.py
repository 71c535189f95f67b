"""Turning a frozen CLIP and a frozen causal LM into an aligned vision-language adapter."""
