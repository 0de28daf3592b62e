"""The reference pipeline's configuration: its Celery app (``config.celery_app``), built on loopline."""
