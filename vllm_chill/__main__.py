"""`python -m vllm_chill`: the `vllm-chill` command."""

import sys

from vllm_chill.cli import main

if __name__ == "__main__":
    sys.exit(main())
