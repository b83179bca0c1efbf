"""Checkpoint loading: Hugging Face folders, GGUF files, the embedded default model, tiny test models, memory sizing
and weight quantization. Sits above the models it instantiates and below the runner that uses them."""
