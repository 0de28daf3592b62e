"""loopline's result backend: Celery's Redis backend storing each result in one round trip."""
