"""Model builders: model source, ONNX export with KV cache, FP8 (TensorRT-LLM) path, repository rendering."""
