"""Run `molgen_export --distributed` with rank 1's streaming made to fail (fault injection for the tests)."""

import sys

import torch.distributed as dist

from molgen_export.pipeline import weight_stream
from molgen_export.cli import main


def failing(self, tie):
    if dist.get_rank() == 1:
        raise OSError(28, "No space left on device (injected on rank 1)")
    return original(self, tie)


original = weight_stream.WeightStreamer.stream_known_tie
weight_stream.WeightStreamer.stream_known_tie = failing
sys.exit(main(sys.argv[1:]))
