"""Wiring loopline into a Celery app: ``install``, the task classes, the producer API and the default app."""
