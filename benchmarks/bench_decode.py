"""End-to-end batch-1 decode / prefill of random BitNetTransformer models, packed vs fp32 vs bf16,
against the machine's memory-bandwidth bound. Same as ``bitnet bench --no-kernels``; arguments as there.

    python benchmarks/bench_decode.py --shapes small,bitnetcpp,2b4t --dense-layers 4
"""

import sys

from bitnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--no-kernels", *sys.argv[1:]]))
