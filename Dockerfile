# The one loopline image: every service in docker-compose.yml (the workers of each pool, Flower, the
# producer) runs it with its own command. Redis is the only other image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Installed into site-packages, so `celery -A config.celery_app` resolves from any working directory
# and the source tree need not stay in the image.
COPY . /tmp/loopline-src
RUN pip install /tmp/loopline-src && rm -rf /tmp/loopline-src

# Workers run untrusted-input I/O jobs: never as root. The home directory is writable, so LOOPLINE_HOME
# (default .loopline/ in the working directory) works for `loopline redis` and `loopline bench`.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin loopline
USER loopline
WORKDIR /home/loopline

# Flower, when a service runs `loopline flower --host 0.0.0.0`.
EXPOSE 5555

CMD ["loopline", "--help"]
