"""``ratequeue api``: serve the HTTP API with uvicorn. Several replicas may serve one Redis (each a
process of this command, behind any load balancer): everything they keep is in Redis."""

from __future__ import annotations

import logging

import click

from ratequeue.errors import ConfigError, UsageError


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to bind.")
def api_command(host: str, port: int) -> None:
    """Serve OpenAI's Files and Batches API (for the official SDK's base_url) on HOST:PORT.

    Callers are the tenants of RATEQUEUE_API_TOKENS_FILE (bearer-token hashes). Workers
    (`ratequeue worker`, same RATEQUEUE_REDIS_URL) run the batches.
    """
    import uvicorn

    from ratequeue.config.settings import load_settings
    from ratequeue.producer.api import Client
    from ratequeue.producer.cli_parts import say_redis
    from ratequeue.producer.httpapi.app import Api
    from ratequeue.producer.httpapi.tenants import load_tenants

    # A server's log: timestamps and tracebacks (the CLI's own handler prints one-line messages).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    server_log = logging.getLogger("ratequeue.producer.httpapi")
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    server_log.propagate = False
    settings = load_settings()
    if settings.api_tokens_file is None:
        raise UsageError("no tenants: set RATEQUEUE_API_TOKENS_FILE to a file of token hashes (see the README)")
    tenants = load_tenants(settings.api_tokens_file)
    say_redis(settings.redis_url)
    client = Client(settings)
    for tenant in tenants:
        for alias in tenant.accounts:
            if alias not in client.accounts.names():
                raise ConfigError(f"{settings.api_tokens_file}: tenant {tenant.name!r}: field 'accounts': "
                                  f"{alias!r} is not an account of the configuration")
    client.redis.ping()  # an unreachable Redis is said now, not at the first request
    config = uvicorn.Config(Api(client, tenants).app(), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    click.echo(f"ratequeue api on http://{host}:{port} ({sum(1 for _ in tenants)} tenants)", err=True)
    server.run()
