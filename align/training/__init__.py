"""The training runtime, one module per job: ``run`` (the session, its config and state),
``model_setup``, ``optim`` (optimizer, step, EMA), ``checkpointing`` (with ``checkpoint_files`` and
``run_folder``), ``trackers`` and ``evaluation``."""
