"""Training: the base model and proposal heads (train), the heads alone (headfit), the
conditioning net alone (condfit), the fitted mixture of the two experts (mixfit), data
augmentation and the speed tools of a training step."""
