"""Models by name: a packaged name, folder or Hugging Face hub id to a local folder, the packaged demo
models, loading a causal LM, and the sentence embedder of coverage."""
