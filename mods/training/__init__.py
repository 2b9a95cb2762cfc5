"""Fine-tuning the base model on selected rows: ``TrainConfig``, ``train.train_model``, and the
loop's data, loss, batch plan, checkpoints and processes."""
