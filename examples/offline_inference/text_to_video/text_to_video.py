"""Offline text-to-video with a sequence-parallel transformer; frames written as an animated GIF.

    python examples/offline_inference/text_to_video/text_to_video.py \
        --model tiny-wan --prompt "A cat walking in the snow" --num-frames 9 --ulysses-degree 2
"""

import argparse
import sys

from meshsp.cli import add_generate_args, run_generate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_args(parser)
    parser.set_defaults(model="tiny-wan", num_frames=5, output="output.gif", width=64, height=64)
    sys.exit(run_generate(parser.parse_args()))
