"""One experiment run -> one results row: the Hydra app over spinquant/configs (same as `spinquant run`).

    python experiments/run.py model=ref-llama quant=w4a8_gptq
    python experiments/run.py -m +experiment=demo            # a table's sweep (configs/experiment/<table>.yaml)
    python experiments/run.py -m +experiment=demo hydra/launcher=parallel   # its runs in parallel processes (joblib)

The work is `spinquant.pipeline.run` (load, rotate, quantize or QAT, evaluate, pack, write the row atomically; a
rerun with the same resolved config is skipped); `sweep.skip` rules drop the combinations of a sweep that are not
rows of its table (spinquant/sweeps.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spinquant.cli import hydra_entry  # noqa: E402

if __name__ == "__main__":
    hydra_entry()
