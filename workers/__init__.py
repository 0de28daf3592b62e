"""The reference pipeline's workers: ``loopline worker`` or ``celery -A config.celery_app worker`` from here.

The pools and the worker machinery are loopline's (``loopline.concurrency``, ``loopline.worker``);
``workers.asyncio_pool:TaskPool`` stays as the name older commands use for the asyncio pool.
"""
