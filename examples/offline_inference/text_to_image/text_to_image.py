"""Offline text-to-image with a sequence-parallel transformer.

    python examples/offline_inference/text_to_image/text_to_image.py \
        --model tiny-qwen-image --prompt "A cat sitting on a windowsill" --ulysses-degree 2
"""

import argparse
import sys

from meshsp.cli import add_generate_args, run_generate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_args(parser)
    sys.exit(run_generate(parser.parse_args()))
