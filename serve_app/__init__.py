"""A Ray Serve gateway that sends OpenAI-style requests only to live vLLM replicas."""
