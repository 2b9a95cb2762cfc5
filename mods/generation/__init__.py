"""The seed model answers instructions: ``GenerationConfig``, the transformers and vLLM
engines behind ``answers.open_answer_engine``, and the prompt tokens both feed."""
