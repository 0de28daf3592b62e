# The one loopline image: every service in docker-compose.yml (the workers of each pool, Flower, the
# producer) runs it with its own command. Redis is the only other image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The library goes into site-packages; the reference pipeline (config/, tasks/, workers/) is not in the wheel
# and stays in /app, the working directory, where `celery -A config.celery_app` finds it.
COPY . /tmp/loopline-src
RUN pip install /tmp/loopline-src && mkdir /app \
    && cp -r /tmp/loopline-src/config /tmp/loopline-src/tasks /tmp/loopline-src/workers /app/ \
    && rm -rf /tmp/loopline-src

# Workers run untrusted-input I/O jobs: never as root. LOOPLINE_HOME points at the writable home directory,
# so `loopline redis` and `loopline bench` work from /app.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin loopline
USER loopline
WORKDIR /app
ENV LOOPLINE_HOME=/home/loopline/.loopline

# Flower, when a service runs `loopline flower --host 0.0.0.0`.
EXPOSE 5555

CMD ["loopline", "--help"]
