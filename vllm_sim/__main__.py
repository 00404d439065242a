"""`python -m vllm_sim`: run one simulated vLLM server."""

import sys

from .cli import main

sys.exit(main())
