"""The worker's side of accounts (worker/routing.py, worker/upstream.py): a job's request on its route
(URL, headers, body's model) and the bucket it draws from; credentials never cross accounts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson

from ratequeue.config.accounts_load import implicit_table, load_account_table
from ratequeue.config.models import load_model_table
from ratequeue.config.settings import load_settings
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker.routing import Routing, held_accounts
from ratequeue.worker.upstream import UpstreamClient
from tests.test_accounts_submit import MODELS  # team-a, team-b, gpu and azure-eu

AZURE_KEY = "0123456789abcdefazuresecret"
KEY_A = "sk-team-a-0123456789abcdef"


def _routing(tmp_path: Path) -> Routing:
    path = tmp_path / "models.toml"
    path.write_text(MODELS)
    settings = load_settings({"RATEQUEUE_MODELS_FILE": str(path)})
    env = {"KEY_A": KEY_A, "AZURE_EU_KEY": AZURE_KEY}  # no KEY_B here
    return Routing(load_account_table(settings, env=env, require_credentials=False))


def _job(model: str, account: str | None, body_model: str | None = None) -> StoredJob:
    body = {"model": body_model or model, "messages": [{"role": "user", "content": "hi"}]}
    return StoredJob("c-1", 1, "/v1/chat/completions", body, model, 10, 5, 5, account)


def test_an_azure_job_goes_to_its_deployment_with_the_api_key_and_draws_on_the_deployments_bucket(
        tmp_path: Path) -> None:
    routing = _routing(tmp_path)
    job = _job("gpt-4o-mini", "azure-eu", body_model="gpt-4o-mini-2024-07-18")
    target = routing.target("batch-account", job)
    assert (target.account, target.spec.name) == target.route.pair == (target.route.account.bucket_id, "gpt4omini-eu")
    assert (target.spec.rpm, target.spec.tpm) == (1200, 200000)
    url, body, auth = routing.request(target.route, job)
    assert url == ("https://myres-eu.openai.azure.com/openai/deployments/gpt4omini-eu/chat/completions"
                   "?api-version=2024-10-21")
    assert body["model"] == "gpt4omini-eu" and job.body["model"] == "gpt-4o-mini-2024-07-18"  # the job is untouched
    assert auth == {"api-key": AZURE_KEY}


def test_each_account_sends_its_own_credentials_and_a_missing_key_refuses_only_its_account(tmp_path: Path) -> None:
    routing = _routing(tmp_path)
    a = routing.target("x", _job("gpt-4o-mini", "team-a", body_model="gpt-4o-mini-2024-07-18"))
    url, body, auth = routing.request(a.route, _job("gpt-4o-mini", "team-a", body_model="gpt-4o-mini-2024-07-18"))
    assert (url, auth) == ("https://api.openai.com/v1/chat/completions", {"authorization": f"Bearer {KEY_A}"})
    assert body["model"] == "gpt-4o-mini-2024-07-18"  # a snapshot is sent as written
    assert a.refused is None and a.account == a.route.account.bucket_id != "x"
    gpu = routing.target("x", _job("llama3.1:8b", "gpu"))
    assert routing.request(gpu.route, _job("llama3.1:8b", "gpu"))[2] == {}  # no key, not even the environment's
    assert not gpu.spec.limits_known
    b = routing.target("x", _job("gpt-4o-mini", "team-b"))
    assert b.refused is not None and "KEY_B is not set" in b.refused
    assert held_accounts(routing.accounts) == ["azure-eu", "gpu", "team-a"]
    assert KEY_A in routing.secrets() and AZURE_KEY in routing.secrets()


def test_without_accounts_the_batchs_account_keys_the_bucket_and_the_clients_own_key_sends() -> None:
    settings = load_settings({"OPENAI_API_KEY": KEY_A})
    routing = Routing(implicit_table(settings, load_model_table(settings)))
    job = _job("gpt-4o-mini", None, body_model="gpt-4o-mini-2024-07-18")
    target = routing.target("the-batchs-account", job)
    assert (target.account, target.spec.name) == ("the-batchs-account", "gpt-4o-mini")
    assert routing.request(target.route, job) == ("/v1/chat/completions", job.body, None)
    assert held_accounts(routing.accounts) == []


def test_the_client_sends_an_accounts_headers_instead_of_its_own_never_beside_them() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    async def calls() -> None:
        client = UpstreamClient("http://env.example.test", "sk-env-0123456789abcdef", "org-env",
                                transport=httpx.MockTransport(answer))
        await client.post("/v1/chat/completions", {"model": "m"})
        await client.post("http://gpu1:8000/v1/chat/completions", {"model": "m"}, "b/c", auth={})
        await client.post("https://res.openai.azure.com/openai/deployments/d/chat/completions?api-version=1",
                          {"model": "d"}, auth={"api-key": AZURE_KEY})
        await client.aclose()

    asyncio.run(calls())
    own, gpu, azure = seen
    assert str(own.url) == "http://env.example.test/v1/chat/completions"
    assert own.headers["authorization"] == "Bearer sk-env-0123456789abcdef"
    assert str(gpu.url) == "http://gpu1:8000/v1/chat/completions" and gpu.headers["x-client-request-id"] == "b/c"
    assert "authorization" not in gpu.headers and "openai-organization" not in gpu.headers
    assert azure.url.params["api-version"] == "1" and azure.headers["api-key"] == AZURE_KEY
    assert "authorization" not in azure.headers
    assert orjson.loads(azure.content) == {"model": "d"}


def test_two_openai_accounts_of_one_model_draw_on_buckets_sized_by_their_own_limits(tmp_path: Path) -> None:
    from tests.test_config_accounts import TIERS

    path = tmp_path / "models.toml"
    path.write_text(TIERS)
    settings = load_settings({"RATEQUEUE_MODELS_FILE": str(path)})
    routing = Routing(load_account_table(settings, env={"KEY_1": "sk-tier-one-0123456789"}, require_credentials=False))
    one = routing.target("x", _job("gpt-4o-mini", "tier1", body_model="gpt-4o-mini-2024-07-18"))
    five = routing.target("x", _job("gpt-4o-mini", "tier5"))  # no key here: sized all the same
    assert (one.spec.rpm, one.spec.tpm, one.spec.name) == (500, 200_000, "gpt-4o-mini")
    assert (five.spec.rpm, five.spec.tpm, five.spec.name) == (30_000, 150_000_000, "gpt-4o-mini")
    assert one.key != five.key and five.refused is not None
