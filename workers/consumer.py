"""The worker's consumer: dead-letter hooks (deadletter.consumer) plus task events sent in batches on a timer.

With an event loop (every pool but gevent: ``WorkController.should_use_eventloop``), Celery buffers
task events (``task-received``, ``task-started``, ``task-succeeded`` …) and sends each buffer as one
``task.multi`` message; but
``celery.worker.consumer.consumer.Consumer.on_send_event_buffered`` schedules a flush on the hub's very
next iteration, so a busy worker publishes one small message per task or two. On an asyncio worker at
-c 1000 that was a sixth of its CPU. Here the buffer goes out every ``LOOPLINE_EVENT_FLUSH_MS`` (100 ms),
or as soon as it holds EVENT_BUFFER_LIMIT events, and once more when the consumer shuts down: Flower and
``celery events`` see every event, at most that much later. The gevent pool, which Celery runs without an
event loop, keeps sending each event at once (stock Celery).
"""

from __future__ import annotations

from typing import Any

from deadletter.consumer import DeadLetterConsumer

__all__ = ["EVENT_BUFFER_LIMIT", "Consumer"]

EVENT_BUFFER_LIMIT = 500  # events; about 150 KB of JSON in one message


class Consumer(DeadLetterConsumer):
    """``worker_consumer`` of the loopline app (config/celery_app.py)."""

    def register_with_event_loop(self, hub: Any) -> None:
        # Called by celery.worker.loops.asynloop on every (re)connection, after the Events step built the
        # dispatcher; timer entries added here are among those asynloop cancels when the connection fails.
        super().register_with_event_loop(hub)
        if self.event_dispatcher is not None:
            self.event_dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        from config.celery_app import settings

        hub.call_repeatedly(settings.event_flush_ms / 1000, self._flush_events)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        # Celery closes the broken connection here (the Redis channel puts every unacked message back in its
        # queue) and only then, from on_close, calls pool.flush(). A job of the asyncio pool that was waiting
        # for a slot could start in between and then run twice; flushed first, it never starts.
        if self.pool is not None and self.pool.flush:  # as Celery's on_close checks: billiard's may be None
            self.pool.flush()
        super().on_connection_error_after_connected(exc)

    def on_send_event_buffered(self) -> None:
        """Leave the buffer to the timer (Celery's flushes on the next loop iteration)."""

    def shutdown(self) -> None:
        self._flush_events()  # what the timer has not sent yet: the last jobs' events
        super().shutdown()

