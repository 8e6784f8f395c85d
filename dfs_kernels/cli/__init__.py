"""The command-line programs, installed as console scripts (``pyproject.toml``, ``[project.scripts]``):

- ``dfs-train`` (``python -m dfs_kernels.cli.train``): train a multi-exit network with a strategy.
- ``dfs-anytime`` (``python -m dfs_kernels.cli.anytime``): anytime and budgeted evaluation of trained runs.
- ``dfs-info`` (``python -m dfs_kernels.cli.info``): what this installation can do.
- ``dfs-train-step`` (``python bench/train_step.py``): the training-step benchmark of a source checkout.

Every program's ``--help`` shows its defaults and choices.
"""
