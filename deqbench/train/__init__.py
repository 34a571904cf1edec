"""Training of MDEQ classifiers: run plans, the loop, distributed helpers and result files.

Modules, from the bottom up:

- ``schedule``: budgets, cosine learning rate, warm-up length
- ``sampling``: resumable data order; ``seeding``: seeds of every generator
- ``distributed``: torchrun process groups and cross-process BatchNorm
- ``metrics``, ``progress``: per-epoch sums and the hooks for tqdm bars
- ``settings``, ``checkpointing``, ``loop``: the Trainer
- ``report``: result file and verdict; ``timing``: seconds per step
- ``reproduce``: from a command-line request to the result file

This package imports none of them, so the light modules load without the
model or data code.
"""
