"""Fine-tune a diffusers pipeline's transformer (flow matching) on data x sequence-parallel ranks.

    python examples/training/train.py --model tiny-qwen-image --steps 30 --batch-size 4 \
        --output runs/shapes --data-parallel-size 2

The same flags as ``meshsp train``; under torchrun every process is one rank.
"""

import argparse
import sys

from meshsp.train.cli import add_train_args, run_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    sys.exit(run_train(parser.parse_args()))
