"""Models by name: a folder or packaged name to a local folder, the packaged demo
models, loading a causal LM, and the sentence embedder of coverage."""
