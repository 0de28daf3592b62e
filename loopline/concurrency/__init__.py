"""loopline's pools: the asyncio pool (``loopline.concurrency.asyncio:TaskPool``) and the coroutine bridge.

The path of one message, from Redis to its ack, on a worker of an app with loopline installed (the asyncio
pool; the other pools differ only in step 4, where Celery's own pool runs the request):

1. **Fetch** (``loopline.transport.redis.Channel._brpop_start``/``_brpop_read``): one Lua call
   (``loopline.transport.fetch.POP_SCRIPT``) pops up to the prefetch credit's worth of entries and records each
   in kombu's ``unacked`` hash in the same step, so a worker killed at any moment leaves every message either
   queued or unacked (redelivered after the visibility timeout). Each entry is checked (``_checked``: size,
   JSON, envelope shape); a bad one is dead-lettered and unrecorded, a good one becomes a kombu message.
2. **Consume** (``loopline.worker.consumer.DeadLetterConsumer.create_task_handler``): the task message is
   checked (``loopline.deadletter.messages.message_problem``) and its delivery count read (a redelivered job
   started ``max_deliveries`` times is dead-lettered as poison); then Celery's strategy
   (``celery.worker.strategy.default``) builds the ``Request``, checks revoked and expired, and reserves it.
3. **Hand over** (``Request.execute_using_pool`` → ``TaskPool.on_apply``): the consumer's thread wraps the
   request in a ``Job`` and schedules it on the pool's event loop thread.
4. **Run** (``TaskPool._run``): the job waits for one of ``-c`` slots, is checked for a revoke once more, and
   is accepted (``task-started``). An ``async def`` task runs Celery's tracer (``celery.app.trace``: signals,
   states, retries) inside a greenlet on the loop (``bridge.run_in_greenlet``); the coroutine's awaits go to
   the loop through ``bridge.await_only``/``drive``, which also raise the soft time limit at an ``await``. A
   sync task runs whole on the pool's threads. The tracer's ``task_prerun`` counts a redelivered job's start
   (``loopline.deadletter.hooks``); its result write joins the other writes of the loop iteration in one
   pipeline (``loopline.backends.redis.RedisBackend``, ``bridge.defer``).
5. **Ack** (``TaskPool._run`` → ``_settle`` → Celery's ``Request.on_success`` → ``Request.acknowledge``): once
   the result is stored, the ack goes to the consumer's hub (``Consumer.call_soon_ack``), where
   ``loopline.transport.redis.QoS.ack`` returns the prefetch credit at once and removes the ``unacked`` record
   within ``ACK_DELAY_S``, in one round trip with the other acks of that moment.
"""
