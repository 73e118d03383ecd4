"""The training application's components: the job config (YAML, overrides,
validation), datasets and their partitions, models and the model file,
collective evaluation, the run folder's logs, and the simulator's engine
(simulation: virtual workers on a virtual clock). The commands at the package
root (train, simulate) compose them with the optimizer below."""
