"""Data: tokenizers, conversation formats and loss masks, images, sources and the Grain pipeline."""
