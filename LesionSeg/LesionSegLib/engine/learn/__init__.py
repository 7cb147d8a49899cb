"""Learning: segmenter and classifier training, retraining from feedback, model versions, jobs."""
