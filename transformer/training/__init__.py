"""The training system: one loop for every task, with its config, parallelism and checkpoints.

    from transformer.training import loop
    result = loop.train_and_evaluate(config, workdir)

The loop (`loop.py`) imports nothing task-specific: a task (`tasks.py`) brings its model call,
loss weights and evaluators.
"""
