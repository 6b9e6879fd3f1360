"""Ray Train jobs: teacher training and distillation with checkpoints, resume and retries."""
