"""The worker process: its consumer, per-pool sizing, the ``loopline worker`` launcher and the supervisor."""
