"""ratequeue package."""
