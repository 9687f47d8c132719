"""Azure OpenAI's error bodies, worded as Azure words them.

Sources (public reports quoting real responses):
- 401 api-key: ``{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API
  endpoint. ..."}}`` (microsoft/semantic-kernel#10337, SciSharp/BotSharp#386).
- 401 Entra ID token: "Unauthorized. Access token is missing, invalid, audience is incorrect
  (https://cognitiveservices.azure.com), or have expired." (the message Azure AI services give a bad bearer token).
- 404 unknown deployment: ``DeploymentNotFound`` (chatboxai/chatbox#861,
  Azure-Samples/azure-search-openai-demo-csharp#379).
- 404 without ``api-version``: ``{"error":{"code":"404","message":"Resource not found"}}``
  (MicrosoftDocs/azure-docs#114602 asks for a 400 and was closed; ThinkInAIXYZ/deepchat#262).
- 429: "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-06-01 have exceeded
  token rate limit of your current OpenAI S0 pricing tier. Please retry after 86400 seconds." (a daily quota) and
  "... have exceeded call rate limit ..." for requests (clemenssiebler.com, "A Guide to Azure OpenAI Service's
  Rate Limits and Monitoring").
- 400 content filter: code ``content_filter``, ``innererror.code`` ``ResponsibleAIPolicyViolation`` with
  ``content_filter_result`` per category (Azure's content filtering docs; microsoft/azurechat#351 quotes the
  message).
"""

from __future__ import annotations

from typing import Any

# The operation Azure names in a 429, per endpoint kind ("Responses_Create" is by analogy: not seen quoted).
OPERATIONS = {
    "chat": "ChatCompletions_Create",
    "embeddings": "Embeddings_Create",
    "completions": "Completions_Create",
    "responses": "Responses_Create",
}
CATEGORIES = ("hate", "self_harm", "sexual", "violence")
DAILY_QUOTA_SECONDS = 86_400
_QUOTA_URL = "https://aka.ms/oai/quotaincrease"
_FILTER_DOCS = "https://go.microsoft.com/fwlink/?linkid=2198766"


def azure_error(code: str, message: str) -> dict[str, Any]:
    """The ``{"error": {"code", "message"}}`` envelope of Azure's gateway errors."""
    return {"error": {"code": code, "message": message}}


def invalid_key() -> dict[str, Any]:
    """401 for a missing or wrong ``api-key``."""
    return azure_error(
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
        "for an active subscription and use a correct regional API endpoint for your resource.",
    )


def invalid_token() -> dict[str, Any]:
    """401 for a wrong Entra ID bearer token."""
    return azure_error(
        "401",
        "Unauthorized. Access token is missing, invalid, audience is incorrect "
        "(https://cognitiveservices.azure.com), or have expired.",
    )


def deployment_not_found() -> dict[str, Any]:
    """404 for a deployment the resource does not have."""
    return azure_error(
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment within the last "
        "5 minutes, please wait a moment and try again.",
    )


def resource_not_found() -> dict[str, Any]:
    """404 for a request without ``api-version`` (Azure answers it so, not with a 400)."""
    return azure_error("404", "Resource not found")


def rate_limited(kind: str, api_version: str, limit: str, seconds: int) -> dict[str, Any]:
    """429; ``limit`` is "token" or "call" (requests), ``seconds`` the whole seconds to wait."""
    return azure_error(
        "429",
        f"Requests to the {OPERATIONS[kind]} Operation under Azure OpenAI API version {api_version} have "
        f"exceeded {limit} rate limit of your current OpenAI S0 pricing tier. Please retry after {seconds} "
        f"seconds. Please go here: {_QUOTA_URL} if you would like to further increase the default rate limit.",
    )


def daily_quota(kind: str, api_version: str) -> dict[str, Any]:
    """429 once a deployment's daily quota is spent: "retry after 86400 seconds", a day, not a blip."""
    return azure_error(
        "429",
        f"Requests to the {OPERATIONS[kind]} Operation under Azure OpenAI API version {api_version} have "
        f"exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after "
        f"{DAILY_QUOTA_SECONDS} seconds.",
    )


def filter_results(flagged: bool) -> dict[str, Any]:
    """``content_filter_result(s)``: every category safe, or violence flagged high."""
    results: dict[str, Any] = {c: {"filtered": False, "severity": "safe"} for c in CATEGORIES}
    if flagged:
        results["violence"] = {"filtered": True, "severity": "high"}
    return results


def prompt_filtered() -> dict[str, Any]:
    """400 for a prompt the content filter refuses."""
    return {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
            "policy. Please modify your prompt and retry. To learn more about our content filtering policies "
            f"please read our documentation: {_FILTER_DOCS}",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": filter_results(True)},
        }
    }
