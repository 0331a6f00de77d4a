"""List prices, so a run's report can say what it cost (or would cost) before the invoice does.

USD per 1M tokens, from OpenAI's public price list; the Batch API bills half. Cached-input
discounts are ignored, so estimates err high. Update the table when prices change.
"""

from __future__ import annotations

# model -> (input, output) USD per 1M tokens (standard, non-batch).
PRICES_PER_1M: dict[str, tuple[float, float]] = {
    "gpt-4o-2024-11-20": (2.50, 10.00),  # the paper's model
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini-2024-07-18": (0.15, 0.60),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1-2025-04-14": (2.00, 8.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
BATCH_DISCOUNT = 0.5


def estimate_cost_usd(model: str, prompt_tokens: int, completion_tokens: int,
                      batch: bool) -> float | None:
  """The list-price cost of the tokens; None for a model not in the table (e.g. a local vLLM)."""
  prices = PRICES_PER_1M.get(model)
  if prices is None:
    return None
  cost = (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6
  return cost * BATCH_DISCOUNT if batch else cost
