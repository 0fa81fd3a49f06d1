"""Loaders: model files (Hugging Face safetensors, GGUF) and tokenizers into tensorweave."""
