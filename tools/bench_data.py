"""Data-pipeline throughput on this machine; see ``olmo_mini.bench.data``.

python tools/bench_data.py                 # stdlib corpus, default tokenizer, all cores
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the corpus and tokenizer are local

from olmo_mini.bench.data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
