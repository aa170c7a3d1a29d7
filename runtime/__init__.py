"""Torch-free runtime: the exported ONNX model, the tokenizer, the feature cache and the rerank scores."""
