"""Training: LoRA/QLoRA/full fine-tuning as a resumable job. `loop.run` is the stage."""
