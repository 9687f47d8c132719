"""``ratequeue sim`` / ``python -m ratequeue.sim``: run the OpenAI-compatible simulator."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from ratequeue.sim.config import (
    CHARGE_RULES,
    DIALECTS,
    PROMPT_ESTIMATES,
    ConfigError,
    SimConfig,
    parse_model_spec,
)
from ratequeue.sim.engine import Engine
from ratequeue.sim.server import serve
from ratequeue.sim.tokens import PromptCounter


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (optional, faster), else on asyncio's loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


@click.command("sim")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8900, show_default=True, type=int, help="Port; 0 picks a free one.")
@click.option("--rpm", default=SimConfig.rpm, show_default=True, type=int,
              help="Default requests per minute.")
@click.option("--tpm", default=SimConfig.tpm, show_default=True, type=int,
              help="Default tokens per minute.")
@click.option("--burst-seconds", default=SimConfig.burst_seconds, show_default=True, type=float,
              help="Bucket capacity in seconds of limit (60 = a whole minute's budget).")
@click.option("--context", default=SimConfig.context, show_default=True, type=int,
              help="Default context window, tokens.")
@click.option("--max-output", default=SimConfig.max_output, show_default=True, type=int,
              help="Default max output tokens, charged when a request sets no max.")
@click.option("--model", "models", multiple=True, metavar="SPEC",
              help="Per-model limits, repeatable: NAME:rpm=500:tpm=30000:context=128000:max_output=16384 "
                   "(also burst, encoding, input_price, output_price in USD per 1M tokens).")
@click.option("--strict-models", is_flag=True,
              help="Answer 404 model_not_found for models not given by --model.")
@click.option("--charge-rule", type=click.Choice(CHARGE_RULES), default=SimConfig.charge_rule,
              show_default=True,
              help="TPM charge at arrival: sum = prompt + n*max_output; max = max(prompt, n*max_output).")
@click.option("--charge-n/--no-charge-n", "charge_n", default=True, show_default=True,
              help="Whether the charged output allowance counts each of the n choices (else one per prompt).")
@click.option("--missing-max-charge", default=None, type=int, metavar="TOKENS",
              help="Output allowance charged per choice when a request sets no max "
                   "[default: the model's max output].")
@click.option("--prompt-estimate", type=click.Choice(PROMPT_ESTIMATES), default=SimConfig.prompt_estimate,
              show_default=True, help="How the prompt is counted: tiktoken, or characters / 4.")
@click.option("--latency-ms", default=0.0, show_default=True, type=float, help="Base latency of a reply.")
@click.option("--per-token-ms", default=0.0, show_default=True, type=float,
              help="Extra latency per output token.")
@click.option("--fail-rate", default=0.0, show_default=True, type=float,
              help="Share of accepted requests answered 500/502/503 (equally).")
@click.option("--slow-rate", default=0.0, show_default=True, type=float,
              help="Share of requests made slower.")
@click.option("--slow-ms", default=0.0, show_default=True, type=float, help="Extra delay of a slow request.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of faults and generated output.")
@click.option("--quota-usd", default=None, type=float, help="Answer insufficient_quota once this is spent.")
@click.option("--api-key", default=None,
              help="Require this key: Authorization: Bearer KEY (Azure: api-key: KEY) else 401.")
@click.option("--accept-key", "accept_keys", multiple=True, metavar="KEY",
              help="Another key accepted besides --api-key, repeatable (several accounts on one server).")
@click.option("--buckets-per-key", "per_key_buckets", is_flag=True,
              help="Give each key its own buckets (accounts of their own) instead of one set per model.")
@click.option("--dialect", type=click.Choice(DIALECTS), default=SimConfig.dialect, show_default=True,
              help="Which server to be (see above).")
@click.option("--deployment", "deployments", multiple=True, metavar="SPEC",
              help="Azure: a deployment, repeatable: NAME:model=gpt-4o-mini:tpm=30000[:rpm=..][:daily=..] "
                   "(rpm defaults to 6 per 1,000 TPM; also context, max_output, burst). None given: any "
                   "deployment name, serving the model of its name at --tpm.")
@click.option("--azure-window", type=click.Choice(["1", "10"]), default="10", show_default=True,
              help="Azure: seconds over which a deployment's limits are enforced.")
@click.option("--azure-token-window", default=None, type=float, metavar="SECONDS",
              help="Azure: the token limit's own window [default: --azure-window].")
@click.option("--azure-odd-headers", default=0.0, show_default=True, type=float, metavar="SHARE",
              help="Azure: share of answers whose x-ratelimit-remaining-* read -1 / 0.")
@click.option("--entra-token", default=None, help="Azure: accept Authorization: Bearer TOKEN (Entra ID).")
@click.option("--daily-quota-tokens", default=None, type=int, metavar="TOKENS",
              help="Azure: tokens per deployment per day; then 429 'retry after 86400 seconds' "
                   "(POST /sim/daily-reset starts a new day; POST /sim/config raises it).")
@click.option("--content-filter-word", "content_filter_words", multiple=True, metavar="WORD",
              help="Azure: a prompt holding WORD gets 400 content_filter, repeatable.")
@click.option("--content-filter-output-word", "content_filter_output_words", multiple=True, metavar="WORD",
              help="Azure: a prompt holding WORD gets its output filtered (finish_reason content_filter).")
@click.option("--max-concurrency", default=SimConfig.max_concurrency, show_default=True, type=int,
              help="Self-hosted: requests served at once.")
@click.option("--queue-depth", default=SimConfig.queue_depth, show_default=True, type=int,
              help="Self-hosted: requests waiting beyond --max-concurrency; more are refused.")
@click.option("--overload-status", type=click.Choice(["503", "429"]), default="503", show_default=True,
              help="Self-hosted: status of a refusal (503 as Ollama, 429 as text-generation-inference).")
@click.option("--load-slowdown", default=SimConfig.load_slowdown, show_default=True, type=float,
              help="Self-hosted: per-token time x (1 + this x in service / --max-concurrency).")
@click.option("--no-tokenize", is_flag=True, help="Self-hosted: no POST /tokenize (404).")
@click.option("--tokenize-answer", type=click.Choice(["vllm", "not-json", "no-count"]), default="vllm",
              show_default=True, help="Self-hosted: /tokenize answers vLLM's JSON, an HTML page or JSON with no count.")
@click.option("--tokenize-latency-ms", default=0.0, show_default=True, type=float,
              help="Self-hosted: milliseconds /tokenize takes to answer (a server across a network).")
@click.option("--no-retry-after", is_flag=True, help="Omit retry-after and retry-after-ms on 429s.")
@click.option("--no-ratelimit-headers", is_flag=True, help="Omit all x-ratelimit-* headers.")
@click.option("--organization", default=SimConfig.organization, show_default=True, help="Org named in 429s.")
@click.option("--access-log", is_flag=True, help="Log every request (slows the simulator down).")
@click.option("--tiktoken-cache", default=None, type=click.Path(file_okay=False),
              help="tiktoken cache directory to seed [default: ~/.cache/ratequeue/tiktoken].")
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def sim_command(
    host: str, port: int, models: tuple[str, ...], deployments: tuple[str, ...], strict_models: bool,
    no_retry_after: bool, no_ratelimit_headers: bool, no_tokenize: bool, access_log: bool,
    tiktoken_cache: str | None, log_level: str, **options: Any,
) -> None:
    """Run an OpenAI-compatible API simulator with per-model RPM/TPM buckets and fault injection.

    \b
    Dialects (--dialect):
      openai             api.openai.com: /v1/... with Bearer keys, per-model buckets, x-ratelimit-* headers.
      azure              Azure OpenAI: POST /openai/deployments/NAME/chat/completions (also /embeddings,
                         /completions) and /openai/responses, ?api-version=... required (else 404 "Resource
                         not found", as Azure); api-key: KEY or Authorization: Bearer TOKEN (--entra-token);
                         limits per --deployment over --azure-window seconds; remaining-* headers per window;
                         Azure's 429 wording with retry-after(-ms); --daily-quota-tokens; the content filter;
                         a request without max_tokens is charged the whole context window.
      openai-compatible  a self-hosted server (vLLM, Ollama): any model name, no key (unless --api-key), no
                         rate-limit headers; --max-concurrency served at once, --queue-depth waiting, the rest
                         refused (--overload-status); latency = --latency-ms + --per-token-ms x output tokens x
                         (1 + --load-slowdown x in service / --max-concurrency); GET /v1/models lists the
                         --model names; POST /tokenize {"model","prompt"} -> {"count","max_model_len","tokens"}.
    GET /sim/stats counts, in every dialect, the key fingerprints (sim.keys.fingerprint) each model or
    deployment and each X-Client-Request-Id came with; the self-hosted server's own view is under "server".
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = SimConfig().updated({
            **options,
            "models": dict(parse_model_spec(spec) for spec in models),
            "deployments": dict(parse_model_spec(spec, "deployment") for spec in deployments),
            "tokenize": not no_tokenize,
            "strict_models": strict_models,
            "retry_after": not no_retry_after,
            "ratelimit_headers": not no_ratelimit_headers,
        })
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if access_log:  # its lines are INFO: show them whatever --log-level says
        logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    counter = PromptCounter(tiktoken_cache)
    counter.preload()  # before "listening": a ready simulator answers its first request at full speed
    engine = Engine(config, counter)

    def ready(url: str) -> None:
        click.echo(f"ratequeue-sim listening on {url}")
        sys.stdout.flush()  # a parent process waits for this line

    _run(serve(engine, host, port, access_log=access_log, on_ready=ready))
