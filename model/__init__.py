"""palmax model: a decoder-only transformer in the Gemini/PaLM family (Flax NNX)."""
