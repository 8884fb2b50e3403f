"""Values several modules share, in one place (importing this module costs nothing)."""

# Where steering adds its vector: the seed's "response" (the last prompt token, then every generated token),
# generated tokens only, prompt tokens only, or every position of every forward.
POSITIONS: tuple[str, ...] = ("response", "generated", "prompt", "all")

# The three activations read per example: mean over prompt tokens, mean over response tokens, last prompt token.
VECTOR_KINDS: tuple[str, ...] = ("prompt_avg", "response_avg", "prompt_last")

# The seed's judge threshold: with less probability than this on numbers, the judge did not really answer.
MIN_MASS = 0.25
