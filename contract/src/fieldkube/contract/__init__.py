"""The contract between the fieldkube operator and the trainer, importable by both without torch.

The operator builds the trainer's configuration, reads the MLflow runs the trainer writes and scrapes its
metrics port; each side used to keep its own copy of those names. Everything both must agree on lives
here once: `names` (model names, MLflow tags and metrics, environment variables, ports) and `config` (the
training configuration model, which the operator validates `spec.training` with and the trainer parses).
"""
