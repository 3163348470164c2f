"""Weight conversion between this project and the Hugging Face / PyTorch formats."""
