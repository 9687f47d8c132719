"""The charge rule: how a server prices a request against its TPM limit when it arrives.

Public sources disagree (``/work/shared/docs/openai-facts.md``), along three dimensions, each one
field of :class:`ChargeRule`:

- ``combine``: "sum" = prompt + output allowance (OpenAI's help centre, Azure), "max" = the larger
  of the two (OpenAI's platform docs);
- ``n_multiplies``: whether the output allowance counts every one of the ``n`` choices;
- ``missing_max_tokens``: what one choice is allowed when the request names no max output
  (OpenAI: the model's maximum output is thought; Azure: the whole context). None: the model's
  ``max_output_tokens``, capped by what the prompt leaves of the context window.
- ``fills_context`` (Azure, pinned there, not learned): a choice without a max output reserves what
  the prompt leaves of this context window, so the request is charged the whole context (n = 1).

The model table gives each model a starting guess (``charge_rule`` in models.toml); the workers
learn the server's rule from its remaining-tokens headers (``worker/chargerule.py``) unless it is
pinned (``charge_rule_pinned = true``, or ``RATEQUEUE_LEARN_CHARGE_RULE=0`` for every model).
"""

from __future__ import annotations

from dataclasses import dataclass

COMBINES = ("sum", "max")


@dataclass(frozen=True, slots=True)
class ChargeRule:
    combine: str = "sum"
    n_multiplies: bool = True
    missing_max_tokens: int | None = None
    fills_context: int | None = None

    def price(self, prompt: int, output: int, n: int, defaulted: bool) -> int:
        """The charge of a request of `prompt` tokens whose reserved output is `output` (our own
        reservation: n x the max output per choice, the model's maximum when `defaulted`)."""
        if defaulted and self.missing_max_tokens is not None:
            output = n * self.missing_max_tokens
        elif defaulted and self.fills_context is not None:
            output = n * max(0, self.fills_context - prompt)
        if not self.n_multiplies and n > 1:
            output //= n
        return prompt + output if self.combine == "sum" else max(prompt, output)

    def describe(self) -> str:
        """For logs: ``max, n not counted, 4096 per choice without max_tokens``."""
        parts = [self.combine]
        if not self.n_multiplies:
            parts.append("n not counted")
        if self.missing_max_tokens is not None:
            parts.append(f"{self.missing_max_tokens} per choice without max_tokens")
        elif self.fills_context is not None:
            parts.append(f"the rest of the {self.fills_context}-token context per choice without max_tokens")
        return ", ".join(parts)
