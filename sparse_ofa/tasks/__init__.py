"""Data and quality measures, offline: task datasets (GLUE, SQuAD, Rotten Tomatoes, plain text), the
distillation corpora, task metrics, and STS-B / Rotten Tomatoes evaluation of any encoder."""
