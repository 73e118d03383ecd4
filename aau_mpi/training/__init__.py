"""The training application's components: the job config (YAML, overrides,
validation), datasets and their partitions, models and the model file,
collective evaluation, and the run folder's logs. The commands at the package
root (train, simulate) compose them with the optimizer below."""
