"""The built-in HTTP jobs (fetch_url, deliver_webhook, io_sleep), their specs and the URL guard."""
